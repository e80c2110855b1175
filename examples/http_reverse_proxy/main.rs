//! An HTTP reverse proxy on backhaul: a public relay that routes by Host to web services
//! exposed by edges behind NAT, which dial out over QUIC and never listen.
//!
//! ```text
//! cargo run --example http_reverse_proxy            # all-in-one demo on loopback
//! cargo run --example http_reverse_proxy -- relay --help
//! cargo run --example http_reverse_proxy -- edge --help
//! ```
//!
//! Layout: `relay` (QUIC listener for edges, HTTP listener for the public, admin listener
//! with /healthz and /metrics), `edge` (dial, register, serve local services, reconnect),
//! `metrics`, `demo` (the all-in-one mode). Accepting and authenticating edges on the
//! relay, dialing and reconnecting on the edge, HTTP forwarding on both, the hardened
//! public HTTP server, the relay's saved identity and the per-edge pooled clients are the
//! library's (`backhaul::relay`, `backhaul::edge`, `backhaul::http`, `backhaul::quic`).

mod demo;
mod edge;
mod metrics;
mod relay;

use clap::{Parser, Subcommand};
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// HTTP reverse proxy over QUIC reverse tunnels.
#[derive(Debug, Parser)]
#[command(name = "http_reverse_proxy", version, about)]
struct Cli {
    /// Threads running the proxy's tasks; 0 for one per core. By default one per core
    /// for a relay, and one for an edge (with --lanes, one per core): an edge's QUIC
    /// connection is processed on one thread anyway, and one thread spends about a third
    /// less CPU per request than several (no hand-offs between threads, no contention on
    /// the connection's state). A relay runs a runtime per thread and keeps each edge's
    /// work on one of them (unless --shared-runtime).
    #[arg(long, global = true)]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a relay: accept edges over QUIC and serve the public over HTTP.
    Relay(Box<relay::RelayArgs>),
    /// Run an edge: dial a relay and expose local HTTP services through it.
    Edge(Box<edge::EdgeArgs>),
    /// Relay, edge and a demo web app in one process on loopback (the default).
    Demo(demo::DemoArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Log lines (one per request at `info`) are formatted by the worker that logs them
    // but written by a thread of their own: a slow terminal or pipe then holds up no
    // request. Lossless: a full queue makes loggers wait rather than drop lines. The
    // guard writes out what is queued when `main` returns.
    let (writer, _log_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        // Colour codes only for a terminal, not in files and pipes.
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(writer)
        .init();
    let threads = cli.worker_threads.unwrap_or(match &cli.command {
        Some(Command::Edge(args)) if args.lanes <= 1 => 1,
        _ => 0,
    });
    // A relay runs on shards unless it is given one thread or asks for tokio's shared
    // runtime: a runtime per thread, each edge's work kept on one (`backhaul::shards`).
    let sharded = match &cli.command {
        Some(Command::Relay(args)) => !args.shared_runtime && threads != 1,
        _ => false,
    };
    let work = async {
        match cli.command {
            Some(Command::Relay(args)) => relay::run(*args).await,
            Some(Command::Edge(args)) => edge::run(*args).await,
            Some(Command::Demo(args)) => demo::run(args).await,
            None => demo::run(demo::DemoArgs::default()).await,
        }
    };
    let result = if sharded {
        let count = match threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            threads => threads,
        };
        match backhaul::shards::Shards::new(count) {
            Ok(shards) => shards.block_on(work),
            Err(error) => {
                eprintln!("error: cannot start the runtimes: {error}");
                return std::process::ExitCode::FAILURE;
            }
        }
    } else {
        let runtime = match threads {
            0 => tokio::runtime::Runtime::new(),
            1 => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            threads => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build(),
        };
        match runtime {
            Ok(runtime) => runtime.block_on(work),
            Err(error) => {
                eprintln!("error: cannot start the runtime: {error}");
                return std::process::ExitCode::FAILURE;
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The message may carry text from the peer (a rejection reason).
            eprintln!("error: {}", Escaped(&error));
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {}", Escaped(cause));
                source = cause.source();
            }
            exit_code(error.as_ref())
        }
    }
}

/// Exit codes a supervisor can act on: 2 for refused credentials, 3 for a relay
/// certificate the edge does not trust (both need an operator; retrying cannot help).
fn exit_code(error: &(dyn std::error::Error + 'static)) -> std::process::ExitCode {
    if error.downcast_ref::<edge::Unauthorized>().is_some() {
        std::process::ExitCode::from(2)
    } else if error.downcast_ref::<edge::UntrustedRelay>().is_some() {
        std::process::ExitCode::from(3)
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Displays a value with control characters (newline, ESC…) escaped, so that text a peer
/// sent cannot forge log lines or drive the terminal when it is logged or printed.
pub struct Escaped<T>(pub T);

impl<T: std::fmt::Display> std::fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        struct EscapingWriter<'a, 'b>(&'a mut std::fmt::Formatter<'b>);
        impl std::fmt::Write for EscapingWriter<'_, '_> {
            fn write_str(&mut self, text: &str) -> std::fmt::Result {
                for c in text.chars() {
                    if c.is_control() {
                        write!(self.0, "{}", c.escape_default())?;
                    } else {
                        self.0.write_char(c)?;
                    }
                }
                Ok(())
            }
        }
        write!(EscapingWriter(f), "{}", self.0)
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn until_stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Parses durations like `500ms`, `10s`, `2m`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = number_and_unit(text, "duration")?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(number)),
        "s" | "" => Ok(std::time::Duration::from_secs(number)),
        "m" => Ok(std::time::Duration::from_secs(number * 60)),
        _ => Err(format!(
            "invalid duration unit in {text:?} (use ms, s or m)"
        )),
    }
}

/// Splits `12ms` into 12 and `ms`; `what` names the value in the error.
fn number_and_unit<'a>(text: &'a str, what: &str) -> Result<(u64, &'a str), String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number = number
        .parse()
        .map_err(|_| format!("invalid {what} {text:?}"))?;
    Ok((number, unit))
}

/// Parses byte counts like `16MiB`, `512KiB`, `1GiB`, `4096`.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let (number, unit) = number_and_unit(text, "byte count")?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("invalid unit in {text:?} (use B, KiB, MiB or GiB)")),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_with_binary_units() {
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("4096B"), Ok(4096));
        assert!(parse_bytes("16MB").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("99999999999GiB").is_err());
    }

    #[test]
    fn escaped_text_has_no_control_characters() {
        let shown = Escaped("evil\n\x1b[31mFAKE\r\u{85}").to_string();
        assert_eq!(shown, "evil\\n\\u{1b}[31mFAKE\\r\\u{85}");
        assert!(!shown.chars().any(char::is_control));
    }
}
