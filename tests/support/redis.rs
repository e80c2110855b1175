//! A real `redis-server` for a test, started by the test on a free loopback port, killed
//! on drop. It can be SIGKILLed and restarted on the same port (empty: nothing is saved),
//! as a crashed Redis would come back. Included by path from the cluster tests.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server binary the tests run.
pub const REDIS_SERVER: &str = "redis-server";

/// How long a starting server has to answer PING.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// A running (or killed, see [`kill`](Self::kill)) redis-server.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port, or says why not: `None` after
    /// `support::skip_or_fail` if redis-server is not installed.
    pub fn start() -> Option<Self> {
        if Command::new(REDIS_SERVER)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            crate::support::skip_or_fail(&format!(
                "{REDIS_SERVER} is not installed (apt-get install redis-server)"
            ));
            return None;
        }
        // A port just freed can be taken by someone else before the server binds it:
        // try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut server = Self { port, child: None };
            if server.spawn() {
                return Some(server);
            }
        }
        panic!("{REDIS_SERVER} did not start on any of 5 free ports");
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILLs the server (no goodbye to clients) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_WITHIN;
        // The old socket may linger a moment.
        while !self.spawn() {
            assert!(Instant::now() < deadline, "{REDIS_SERVER} did not restart");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A plain connection for checks from the test.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("url")
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connecting to the test's redis-server")
    }

    /// Starts the process and waits until it answers; false if it exited first.
    fn spawn(&mut self) -> bool {
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + READY_WITHIN;
        let client = redis::Client::open(self.url()).expect("url");
        loop {
            let answered = client
                .get_connection_with_timeout(Duration::from_millis(500))
                .and_then(|mut connection| redis::cmd("PING").query::<String>(&mut connection));
            if answered.is_ok() {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))));
            if exited {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "{REDIS_SERVER} did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}
