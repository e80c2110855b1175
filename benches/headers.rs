//! What the relay does to every request's headers before forwarding it, on the header set
//! of a browser's page request: dropping hop-by-hop headers and setting the forwarding
//! headers (both from `backhaul::http`), each timed alone.
//!
//! Run: `cargo bench --bench headers -- --noplot` (about 10 seconds).

use std::net::IpAddr;
use std::time::Duration;

use backhaul::http::authority::Authority;
use backhaul::http::forwarded::{Proto, TrustedProxies};
use backhaul::http::proxy::{is_upgrade, strip_hop_by_hop};
use criterion::{BatchSize, Criterion};
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The headers Chromium sends with a top-level page request over HTTP/1.1.
fn browser_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "web.kiosk.example.net"),
        ("connection", "keep-alive"),
        ("cache-control", "max-age=0"),
        ("upgrade-insecure-requests", "1"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
             Chrome/131.0.0.0 Safari/537.36",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,\
             */*;q=0.8",
        ),
        ("accept-encoding", "gzip, deflate"),
        ("accept-language", "en-US,en;q=0.9"),
        ("cookie", "session=0123456789abcdef; theme=dark"),
    ] {
        headers.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    headers
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let authority: Authority = "web.kiosk.example.net".parse().expect("an authority");
    let peer: IpAddr = "203.0.113.57".parse().expect("an IP");
    let none = TrustedProxies::none();
    let mut group = criterion.benchmark_group("headers");
    group.bench_function("strip_hop_by_hop", |b| {
        b.iter_batched_ref(
            browser_headers,
            |headers| {
                let upgrade = is_upgrade(headers);
                strip_hop_by_hop(headers, upgrade);
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("set_forwarding_headers", |b| {
        b.iter_batched_ref(
            browser_headers,
            |headers| none.set_forwarding_headers(headers, peer, &authority, Proto::Http),
            BatchSize::SmallInput,
        );
    });
    group.bench_function("set_forwarding_headers_ipv6", |b| {
        let peer: IpAddr = "2001:db8:85a3::8a2e:370:7334".parse().expect("an IP");
        b.iter_batched_ref(
            browser_headers,
            |headers| none.set_forwarding_headers(headers, peer, &authority, Proto::Http),
            BatchSize::SmallInput,
        );
    });
    group.finish();
    criterion.final_summary();
}
