//! The benches' tokio runtime: two workers by default, or `BENCH_WORKER_THREADS` of them;
//! 1 runs everything on one thread (a current-thread runtime), as the proxy's edge does
//! by default.

use tokio::runtime::Runtime;

/// The runtime, after printing which one it is.
pub fn from_env() -> Runtime {
    let threads = std::env::var("BENCH_WORKER_THREADS")
        .ok()
        .and_then(|threads| threads.parse::<usize>().ok())
        .unwrap_or(2);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    println!("runtime: {threads} worker thread(s)");
    runtime.expect("tokio runtime")
}
