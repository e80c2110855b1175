//! Idle edges on one relay: the relay's memory and CPU per edge, backhaul beside bare
//! quinn, and what a burst of edges connecting at once costs in dropped datagrams.
//!
//! Each relay runs in a process of its own (this binary, started again with
//! `IDLE_EDGES_ROLE=relay`), so its resident memory is its own; the edges run in other
//! processes (`IDLE_EDGES_ROLE=edges`), one UDP socket per edge, all launched at once.
//! For each kind of relay, in interleaved rounds:
//!
//! - **backhaul**: `relay::server_endpoint` and an `Acceptor` (admission limits raised to
//!   let every edge in at once, any name accepted); each edge dials with
//!   `quic::client_endpoint`, starts a session and registers, then stays idle.
//! - **shards**: the same relay on `backhaul::shards` (two runtimes, one per core here),
//!   its acceptor placing each edge on one (`Acceptor::with_shards`): what a relay run as
//!   the proxy's is costs per idle edge.
//! - **quinn**: a bare quinn endpoint with the same transport settings
//!   (`quic::transport_config`, `IDLE_EDGES_QUINN_STREAMS` streams, 64 unless set); each
//!   edge only connects, and both sides hold the connection and nothing else.
//!
//! The relay starts empty; edges are added in steps (1 000, then 9 000 more at once, to
//! 10 000). After each step: the relay's RSS (`VmRSS`) once the burst has settled, KiB
//! per edge over the empty relay, the relay's CPU while every edge idles (summed over its
//! threads from `/proc/<pid>/task/*/schedstat`) with keep-alives every 5 s, the connect
//! (and registration) times of the step's edges, and the kernel's UDP receive errors
//! during the step (`RcvbufErrors` and `InErrors` of `/proc/net/snmp`, machine-wide).
//!
//! Run: `cargo bench --bench idle_edges` (options after `--`: `--steps 1000,10000`,
//! `--idle-secs 15`, `--rounds 2`, `--kinds quinn,backhaul`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backhaul::quic::{client_endpoint, load_certs, transport_config, Identity};
use backhaul::relay::{
    registration_metadata, AdmissionConfig, AuthRequest, EdgeName, Registry, REGISTER_SERVICE,
};
use backhaul::{Config, Role, SessionClient};

const ALPN: &[u8] = b"backhaul";
const ROLE: &str = "IDLE_EDGES_ROLE";
const QUINN_STREAMS: &str = "IDLE_EDGES_QUINN_STREAMS";

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("relay") => relay(),
        Ok("edges") => edges(),
        _ => orchestrate(),
    }
}

// ----- the orchestrator ----------------------------------------------------------------

struct Options {
    steps: Vec<usize>,
    idle: Duration,
    rounds: usize,
    kinds: Vec<String>,
}

fn options() -> Options {
    let mut options = Options {
        steps: vec![1000, 10_000],
        idle: Duration::from_secs(15),
        rounds: 2,
        kinds: vec!["quinn".into(), "backhaul".into()],
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().cloned().unwrap_or_default();
        match arg.as_str() {
            "--steps" => {
                options.steps = value()
                    .split(',')
                    .filter_map(|n| n.trim().parse().ok())
                    .collect();
            }
            "--idle-secs" => options.idle = Duration::from_secs(value().parse().unwrap_or(15)),
            "--rounds" => options.rounds = value().parse().unwrap_or(2),
            "--kinds" => options.kinds = value().split(',').map(str::to_owned).collect(),
            // `cargo bench` passes `--bench`; anything else unknown is ignored too.
            _ => {}
        }
    }
    options
}

/// One measurement: a relay of `kind` holding `edges` idle edges.
struct Row {
    kind: String,
    round: usize,
    /// Edges launched so far.
    step: usize,
    /// Edges connected (and registered) so far.
    edges: usize,
    rss_kib: u64,
    per_edge_kib: f64,
    idle_cpu_percent: f64,
    connect: Option<String>,
    udp_errors: (u64, u64),
}

fn orchestrate() {
    let options = options();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let dir = std::env::temp_dir().join(format!("idle-edges-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let identity = Identity::self_signed(&["localhost"]).expect("certificate");
    let (cert, key) = (dir.join("cert.der"), dir.join("key.der"));
    std::fs::write(&cert, identity.cert_chain[0].as_ref()).expect("write cert");
    std::fs::write(&key, identity.key.secret_der()).expect("write key");
    println!(
        "idle edges: steps {:?}, {} s idle per step, {} rounds, load before: {}",
        options.steps,
        options.idle.as_secs(),
        options.rounds,
        load_average()
    );

    let mut rows = Vec::new();
    for round in 1..=options.rounds {
        for kind in &options.kinds {
            rows.extend(measure(kind, round, &options, &cert, &key));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    print_table(&rows, &options);
    println!("load after: {}", load_average());
}

fn measure(kind: &str, round: usize, options: &Options, cert: &Path, key: &Path) -> Vec<Row> {
    // `IDLE_EDGES_RELAY_WRAPPER="heaptrack -o /tmp/relay"` runs the relay under a
    // profiler (its RSS then includes the profiler's).
    let own = std::env::current_exe().expect("own path");
    let mut command = match std::env::var("IDLE_EDGES_RELAY_WRAPPER") {
        Ok(wrapper) if !wrapper.trim().is_empty() => {
            let mut words = wrapper.split_whitespace();
            let mut command = Command::new(words.next().unwrap_or_default());
            command.args(words).arg(&own);
            command
        }
        _ => Command::new(&own),
    };
    let mut relay = command
        .env(ROLE, "relay")
        .env("IDLE_EDGES_KIND", kind)
        .env("IDLE_EDGES_CERT", cert)
        .env("IDLE_EDGES_KEY", key)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start relay");
    let mut relay_out = BufReader::new(relay.stdout.take().expect("relay stdout"));
    // "listening <port> <pid>": the pid is the relay's own, also under a wrapper.
    let line = loop {
        let line = read_line(&mut relay_out);
        if line.starts_with("listening ") {
            break line;
        }
        assert!(!line.is_empty(), "the relay ended before listening");
    };
    let mut words = line.split_whitespace().skip(1);
    let port: u16 = words
        .next()
        .and_then(|port| port.parse().ok())
        .expect("relay port");
    let pid: u32 = words
        .next()
        .and_then(|pid| pid.parse().ok())
        .expect("relay pid");
    std::thread::sleep(Duration::from_secs(1));
    let empty_kib = rss_kib(pid);
    let mut rows = vec![Row {
        kind: kind.to_owned(),
        round,
        step: 0,
        edges: 0,
        rss_kib: empty_kib,
        per_edge_kib: 0.0,
        idle_cpu_percent: idle_cpu_percent(pid, options.idle),
        connect: None,
        udp_errors: (0, 0),
    }];

    let mut edge_processes: Vec<Child> = Vec::new();
    let (mut connected, mut held) = (0, 0);
    for &target in &options.steps {
        let count = target.saturating_sub(connected);
        let before = udp_errors();
        let mut edges = Command::new(std::env::current_exe().expect("own path"))
            .env(ROLE, "edges")
            .env("IDLE_EDGES_KIND", kind)
            .env("IDLE_EDGES_CERT", cert)
            .env("IDLE_EDGES_RELAY", format!("127.0.0.1:{port}"))
            .env("IDLE_EDGES_COUNT", count.to_string())
            .env("IDLE_EDGES_FIRST", connected.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start edges");
        let mut edges_out = BufReader::new(edges.stdout.take().expect("edges stdout"));
        let report = read_line(&mut edges_out);
        let after = udp_errors();
        edge_processes.push(edges);
        connected = target;
        // "<connected>/<failed>, …": only edges that connected count per edge.
        held += report
            .split('/')
            .next()
            .and_then(|ok| ok.parse::<usize>().ok())
            .unwrap_or(0);
        // Let handshake leftovers be freed and the burst's timers run out.
        std::thread::sleep(Duration::from_secs(3));
        let rss = rss_kib(pid);
        rows.push(Row {
            kind: kind.to_owned(),
            round,
            step: connected,
            edges: held,
            rss_kib: rss,
            per_edge_kib: (rss.saturating_sub(empty_kib)) as f64 / held.max(1) as f64,
            idle_cpu_percent: idle_cpu_percent(pid, options.idle),
            connect: Some(report),
            udp_errors: (after.0 - before.0, after.1 - before.1),
        });
        eprintln!(
            "{kind} round {round}: {connected} edges, RSS {} MiB",
            rss / 1024
        );
    }
    for mut edges in edge_processes {
        let _ = edges.kill();
        let _ = edges.wait();
    }
    // SIGINT lets the relay exit by itself (a profiler wrapping it then writes its data).
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
    if wait_for_exit(&mut relay, Duration::from_secs(30)).is_none() {
        let _ = relay.kill();
        let _ = relay.wait();
    }
    rows
}

fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn print_table(rows: &[Row], options: &Options) {
    println!();
    println!(
        "| relay | round | idle edges | relay RSS | KiB per edge | × bare quinn | idle CPU ({} s) | CPU per edge × bare quinn | connect + register: ok/failed, p50, p99 | UDP RcvbufErrors / InErrors |",
        options.idle.as_secs()
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let baseline = rows.iter().find(|other| {
            other.kind == "quinn" && other.round == row.round && other.step == row.step
        });
        let ratio = match baseline {
            Some(quinn) if row.edges > 0 && quinn.per_edge_kib > 0.0 => {
                format!("{:.2}", row.per_edge_kib / quinn.per_edge_kib)
            }
            _ => "—".into(),
        };
        let cpu_ratio = match baseline {
            Some(quinn) if row.edges > 0 && quinn.edges > 0 && quinn.idle_cpu_percent > 0.0 => {
                let ours = row.idle_cpu_percent / row.edges as f64;
                let theirs = quinn.idle_cpu_percent / quinn.edges as f64;
                format!("{:.2}", ours / theirs)
            }
            _ => "—".into(),
        };
        let per_edge = if row.edges == 0 {
            "—".into()
        } else {
            format!("{:.1}", row.per_edge_kib)
        };
        println!(
            "| {} | {} | {} | {:.1} MiB | {} | {} | {:.2} % | {} | {} | {} / {} |",
            row.kind,
            row.round,
            row.edges,
            row.rss_kib as f64 / 1024.0,
            per_edge,
            ratio,
            row.idle_cpu_percent,
            cpu_ratio,
            row.connect.as_deref().unwrap_or("—"),
            row.udp_errors.0,
            row.udp_errors.1,
        );
    }
}

fn read_line(out: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    out.read_line(&mut line).expect("child output");
    line.trim().to_owned()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time of every thread of `pid`, from the scheduler's nanosecond counters.
fn cpu_time(pid: u32) -> Duration {
    let mut total = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            total += stat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(total)
}

fn idle_cpu_percent(pid: u32, window: Duration) -> f64 {
    let (start, used_before) = (Instant::now(), cpu_time(pid));
    std::thread::sleep(window);
    let used = cpu_time(pid).saturating_sub(used_before);
    100.0 * used.as_secs_f64() / start.elapsed().as_secs_f64()
}

/// `RcvbufErrors` and `InErrors` of the kernel's UDP counters.
fn udp_errors() -> (u64, u64) {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return (0, 0);
    };
    let field = |wanted: &str| {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == wanted)
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0)
    };
    (field("RcvbufErrors"), field("InErrors"))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ----- the relay process ---------------------------------------------------------------

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(name).unwrap_or_else(|| panic!("{name} not set")))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn relay() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let identity = Identity::from_files(env_path("IDLE_EDGES_CERT"), env_path("IDLE_EDGES_KEY"))
        .expect("identity");
    let kind = std::env::var("IDLE_EDGES_KIND").unwrap_or_default();
    let serve = async move {
        tokio::select! {
            () = serve_relay(identity, &kind) => {}
            // Exits holding everything, so a heap profiler wrapping the relay reports what
            // the edges held as still allocated.
            _ = tokio::signal::ctrl_c() => std::process::exit(0),
        }
    };
    if std::env::var("IDLE_EDGES_KIND").as_deref() == Ok("shards") {
        backhaul::shards::Shards::new(2)
            .expect("shards")
            .block_on(serve);
    } else {
        runtime().block_on(serve);
    }
}

async fn serve_relay(identity: Identity, kind: &str) {
    {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let endpoint = if kind == "quinn" {
            let mut config = backhaul::quic::server_config(identity, ALPN).expect("config");
            config.transport_config(Arc::new(transport_config(quinn_streams())));
            backhaul::quic::server_endpoint_with_config(addr, config).expect("endpoint")
        } else {
            backhaul::relay::server_endpoint(addr, identity, ALPN).expect("endpoint")
        };
        println!(
            "listening {} {}",
            endpoint.local_addr().expect("address").port(),
            std::process::id()
        );
        if kind == "quinn" {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    if let Ok(connection) = incoming.await {
                        connection.closed().await;
                    }
                });
            }
        } else {
            let everyone = AdmissionConfig {
                max_unregistered: 1 << 20,
                max_unregistered_per_source: 1 << 20,
                handshake_rate: 1e9,
                handshake_burst: 1e9,
                ..AdmissionConfig::default()
            };
            let any_name =
                tower::service_fn(
                    |request: AuthRequest| async move { EdgeName::new(request.edge) },
                );
            let mut acceptor = backhaul::relay::Acceptor::new(endpoint, Registry::new(), any_name)
                .with_admission(everyone)
                .with_register_timeout(Duration::from_secs(300));
            if let Some(shards) = backhaul::shards::ShardSet::current() {
                acceptor = acceptor.with_shards(shards);
            }
            acceptor.serve().await;
        }
    }
}

fn quinn_streams() -> u32 {
    std::env::var(QUINN_STREAMS)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64)
}

// ----- the edges process ---------------------------------------------------------------

/// What one edge holds to stay connected (held, never read).
#[allow(dead_code)]
enum Held {
    Quinn(quinn::Connection),
    Session(
        SessionClient,
        tokio::sync::mpsc::Receiver<backhaul::ClientEvent>,
    ),
}

fn edges() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let trusted = load_certs(env_path("IDLE_EDGES_CERT")).expect("certificate");
    let kind = std::env::var("IDLE_EDGES_KIND").unwrap_or_default();
    let relay: SocketAddr = std::env::var("IDLE_EDGES_RELAY")
        .ok()
        .and_then(|addr| addr.parse().ok())
        .expect("IDLE_EDGES_RELAY");
    let number = |name: &str| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (count, first) = (number("IDLE_EDGES_COUNT"), number("IDLE_EDGES_FIRST"));
    runtime().block_on(async move {
        let trusted = Arc::new(trusted);
        let mut joins = Vec::with_capacity(count);
        for i in first..first + count {
            let trusted = Arc::clone(&trusted);
            let kind = kind.clone();
            joins.push(tokio::spawn(async move {
                let started = Instant::now();
                let endpoint = client_endpoint(&trusted, ALPN).ok()?;
                let connection = endpoint.connect(relay, "localhost").ok()?.await.ok()?;
                let held = if kind == "quinn" {
                    Held::Quinn(connection)
                } else {
                    let (client, events) =
                        SessionClient::start(connection, Role::Client, Config::new())
                            .await
                            .ok()?;
                    let name = format!("edge-{i}");
                    client
                        .open(REGISTER_SERVICE, registration_metadata(&name, "token"))
                        .await
                        .ok()?;
                    Held::Session(client, events)
                };
                Some((started.elapsed(), endpoint, held))
            }));
        }
        let mut held = Vec::with_capacity(count);
        let mut times = Vec::with_capacity(count);
        let mut failed = 0;
        for join in joins {
            match join.await.ok().flatten() {
                Some((took, endpoint, edge)) => {
                    times.push(took);
                    held.push((endpoint, edge));
                }
                None => failed += 1,
            }
        }
        times.sort();
        let at = |q: f64| {
            times
                .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
                .map_or(0, |t| t.as_millis())
        };
        println!("{}/{failed}, {} ms, {} ms", times.len(), at(0.5), at(0.99));
        // Idle until the orchestrator ends this process.
        std::future::pending::<()>().await;
        drop(held);
    });
}
