//! Open file limits (issue 14, 10,000 connections): the real binary raises its soft
//! `RLIMIT_NOFILE` to the hard limit at start-up and says so, warns when
//! `max_connections` does not fit in it, and, out of descriptors, neither spins its accept
//! loop nor loses its listener.
//!
//! Each test starts `stowage` (`CARGO_BIN_EXE_stowage`) with the limits set in the child
//! before `exec`, so the test process keeps its own.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

struct Proc {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Starts `stowage` with `RLIMIT_NOFILE` = (`soft`, `hard`) and waits for its listener.
    fn start(soft: u64, hard: u64, proxy_lines: &str) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        let q = |p: std::path::PathBuf| format!("{:?}", p.to_str().unwrap().to_owned());
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:0\"\n{proxy_lines}\n[ca]\ndir = {}\n[cache]\ndir = {}\n",
                q(dir.path().join("certs")),
                q(dir.path().join("cache")),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                rustix::process::setrlimit(
                    rustix::process::Resource::Nofile,
                    rustix::process::Rlimit {
                        current: Some(soft),
                        maximum: Some(hard),
                    },
                )
                .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().expect("spawn stowage");
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") && line.contains("listener=\"proxy\"") {
                    if let Some(i) = line.find("127.0.0.1:") {
                        let port: String = line[i + 10..]
                            .chars()
                            .take_while(|c| c.is_ascii_digit())
                            .collect();
                        let _ = tx.send(format!("127.0.0.1:{port}").parse::<SocketAddr>().unwrap());
                    }
                }
                l.lock().unwrap().push(line);
            }
        });
        let Ok(addr) = rx.recv_timeout(BOUND) else {
            let _ = child.kill();
            panic!(
                "stowage did not report its listener; log:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        Proc {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// (soft, hard) `Max open files` of the running process.
    fn nofile(&self) -> (String, String) {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.child.id())).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[3].to_owned(), f[4].to_owned())
    }

    /// User + system CPU time the process has used.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the `(comm)`: state is the 3rd field, utime the 14th, stime the 15th.
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        let ticks: u64 = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
        // SAFETY: sysconf only reads a constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn startup_raises_the_soft_open_file_limit_to_the_hard_limit() {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .expect("a finite hard limit");
    let soft = 256.min(hard);
    let p = Proc::start(soft, hard, "");
    assert_eq!(p.nofile(), (hard.to_string(), hard.to_string()));
    let line = p.log_lines("open file limit");
    assert_eq!(line.len(), 1, "{:?}", p.log.lock().unwrap());
    assert!(line[0].contains(&format!("soft={hard}")), "{}", line[0]);
    assert!(line[0].contains(&format!("was={soft}")), "{}", line[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_accept_backs_off_and_the_listener_survives() {
    // 64 descriptors in all: the default max_connections (4096) cannot fit, which is
    // warned about; silent clients are held for the header timeout, so they pile up.
    let p = Proc::start(64, 64, "header_timeout = \"60s\"\n");
    assert_eq!(p.nofile(), ("64".to_owned(), "64".to_owned()));
    let warning = p.log_lines("may need up to");
    assert_eq!(warning.len(), 1, "{:?}", p.log.lock().unwrap());
    assert!(
        warning[0].contains("max_connections = 4096"),
        "{}",
        warning[0]
    );

    // More silent connections than descriptors: the kernel completes them all (the
    // backlog), Stowage accepts until EMFILE.
    let mut clients = Vec::new();
    for _ in 0..120 {
        clients.push(tokio::net::TcpStream::connect(p.addr).await.unwrap());
    }
    let deadline = Instant::now() + BOUND;
    while p.log_lines("accept failed").is_empty() {
        assert!(
            Instant::now() < deadline,
            "accept never failed: EMFILE not reached"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failures_before = p.log_lines("accept failed").len();
    let cpu_before = p.cpu();
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let cpu = p.cpu() - cpu_before;
    let failures = p.log_lines("accept failed").len() - failures_before;
    assert!(
        cpu < Duration::from_millis(600),
        "accept loop spins at EMFILE: {cpu:?} CPU in {window:?}"
    );
    // Backing off 100 ms: about 30 attempts in 3 s, not thousands.
    assert!(failures <= 60, "{failures} failed accepts in {window:?}");
    assert!(
        p.log_lines("accept failed")[0].contains("Too many open files"),
        "{:?}",
        p.log_lines("accept failed")[0]
    );

    // Clients gone, descriptors come back; the same listener serves again.
    drop(clients);
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(answer) = healthz(p.addr).await {
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(answer.ends_with("ok"), "{answer}");
            break;
        }
        assert!(Instant::now() < deadline, "the listener never served again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /healthz` on a connection of its own; `None` when it does not answer in time.
async fn healthz(addr: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::timeout(Duration::from_secs(2), async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: stowage\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.ok()?;
        (!answer.is_empty()).then(|| answer.trim_end().to_owned())
    })
    .await
    .ok()?
}
