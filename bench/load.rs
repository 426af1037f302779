//! Load and soak test for Stowage (`cargo run --release --example load -- --help`).
//!
//! Starts, all on loopback: the in-process fake registry from the test harness (TLS, token
//! auth), a TCP echo server for blind tunnels, and the real `stowage` binary as a child
//! process. Two modes:
//!
//! - **Connections** (the default): holds N client connections (CONNECT + TLS + HTTP/1.1
//!   keep-alive, each with its own token). With `--idle S` they first sit idle for S seconds
//!   after logging in (RSS per idle connection); then they run a mix of cache hits, cache
//!   misses (fresh blobs pushed upstream on the fly) and blind tunnels for `--duration`
//!   (RSS per active connection), followed by a `--soak` with Stowage's RSS each minute.
//! - **Slow manifest fills** (`--slow-manifest-fills N`): the fake upstream serves N distinct
//!   manifests of `--manifest-size` slowly (`--manifest-chunk` every `--manifest-pause`), N
//!   clients pull them at once through Stowage; RSS before, peak during, and after.
//!
//! RSS is `VmRSS` from `/proc/<stowage pid>/status`; the load average from `/proc/loadavg`
//! is printed next to each figure, since the machine may be shared. The tool raises its own
//! `RLIMIT_NOFILE` (hard and soft, as far as it may) before starting Stowage, which inherits
//! it. Bounded in count and time; stops by itself; never leaves loopback.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::registry::{OCI_CONFIG, OCI_LAYER, OCI_MANIFEST};
use common::{pseudo_random, sha256_digest, Alpn, FakeRegistry, ProxyClient, Session, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    connections: usize,
    duration: Duration,
    soak: Duration,
    idle: Duration,
    ramp: Option<Duration>,
    stowage: String,
    max_size: String,
    max_connections: Option<usize>,
    nofile: u64,
    slow_manifest_fills: usize,
    manifest_size: usize,
    manifest_chunk: usize,
    manifest_pause: Duration,
    after: Duration,
    after_more: Duration,
    stowage_log: String,
    think: (u64, u64),
}

const HELP: &str = "\
load [--connections 1000] [--idle 0] [--duration 60] [--soak 300] [--ramp SECONDS]
     [--max-connections N] [--nofile 1048576] [--stowage target/release/stowage] [--max-size 256MiB]
     [--think 150,450] [--stowage-log warn]
load --slow-manifest-fills 300 [--manifest-size 4MiB] [--manifest-chunk 64KiB] [--manifest-pause 100]
     [--after 30] [--after-more 60]

  --idle S             hold the connections idle S seconds after login, then report RSS per idle connection
  --duration S         then run the mix for S seconds (RSS per active connection at its end)
  --soak S             then keep running it S seconds, RSS each minute
  --think MIN,MAX      think time between a connection's requests, milliseconds (offered load is
                       about connections / mean think time)
  --ramp S             spread connection set-up over S seconds (default connections/500, at least 3)
  --max-connections N  Stowage's [proxy] max_connections (default connections * 1.25 + 1000: the
                       tunnels of the mix are connections too)
  --nofile N           RLIMIT_NOFILE (soft and hard) for this tool and the Stowage child
  --max-size           Stowage's [cache] max_size: small enough that the misses keep the evictor busy
  --slow-manifest-fills N   N distinct manifests of --manifest-size (also Stowage's
                       max_manifest_size), sent --manifest-chunk bytes every --manifest-pause ms,
                       pulled by N clients at once; RSS before, peak, --after s and a further
                       --after-more s after the pulls ended (client connections closed)";

fn parse_size(v: &str) -> usize {
    let v = v.trim();
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: usize = num.parse().unwrap_or_else(|_| panic!("size {v:?}"));
    n * match unit {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        _ => panic!("size {v:?}: unit B, KiB, MiB or GiB"),
    }
}

fn parse_args() -> Args {
    let mut a = Args {
        connections: 1000,
        duration: Duration::from_secs(60),
        soak: Duration::from_secs(300),
        idle: Duration::ZERO,
        ramp: None,
        stowage: "target/release/stowage".into(),
        max_size: "256MiB".into(),
        max_connections: None,
        nofile: 1 << 20,
        slow_manifest_fills: 0,
        manifest_size: 4 << 20,
        manifest_chunk: 64 << 10,
        manifest_pause: Duration::from_millis(100),
        after: Duration::from_secs(30),
        after_more: Duration::from_secs(60),
        stowage_log: "warn".into(),
        think: (150, 450),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let secs = |v: &str, what: &str| {
        Duration::from_secs(v.parse().unwrap_or_else(|_| panic!("{what} SECONDS")))
    };
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--connections" => a.connections = v.parse().expect("--connections N"),
            "--duration" => a.duration = secs(&v, "--duration"),
            "--soak" => a.soak = secs(&v, "--soak"),
            "--idle" => a.idle = secs(&v, "--idle"),
            "--ramp" => a.ramp = Some(secs(&v, "--ramp")),
            "--stowage" => a.stowage = v,
            "--max-size" => a.max_size = v,
            "--max-connections" => {
                a.max_connections = Some(v.parse().expect("--max-connections N"))
            }
            "--nofile" => a.nofile = v.parse().expect("--nofile N"),
            "--slow-manifest-fills" => {
                a.slow_manifest_fills = v.parse().expect("--slow-manifest-fills N")
            }
            "--manifest-size" => a.manifest_size = parse_size(&v),
            "--manifest-chunk" => a.manifest_chunk = parse_size(&v),
            "--manifest-pause" => {
                a.manifest_pause =
                    Duration::from_millis(v.parse().expect("--manifest-pause MILLISECONDS"))
            }
            "--after" => a.after = secs(&v, "--after"),
            "--after-more" => a.after_more = secs(&v, "--after-more"),
            "--stowage-log" => a.stowage_log = v,
            "--think" => {
                let (lo, hi) = v.split_once(',').expect("--think MIN,MAX milliseconds");
                a.think = (
                    lo.parse().expect("--think MIN"),
                    hi.parse().expect("--think MAX"),
                );
                assert!(a.think.1 > a.think.0, "--think MIN,MAX");
            }
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, `RssAnon`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

/// The 1-minute load average.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn max_open_files(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    format!("soft {} hard {}", f[3], f[4])
                })
        })
        .unwrap_or_default()
}

/// Raises this process's `RLIMIT_NOFILE` to `want` (hard too: root may), else soft to
/// the hard limit. The Stowage child inherits it.
fn raise_fd_limit(want: u64) -> (Option<u64>, Option<u64>) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let want = want.min(nr_open);
    let both = Rlimit {
        current: Some(want),
        maximum: Some(want),
    };
    if setrlimit(Resource::Nofile, both).is_err() {
        let cur = getrlimit(Resource::Nofile);
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: cur.maximum,
                maximum: cur.maximum,
            },
        );
    }
    let now = getrlimit(Resource::Nofile);
    (now.current, now.maximum)
}

#[derive(Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    tunnels: AtomicU64,
    errors: AtomicU64,
    /// Connections found closed by Stowage between requests, redialled (not errors: HTTP
    /// lets a server close an idle keep-alive connection, clients redial).
    redials: AtomicU64,
    hit_latency_us: Mutex<Vec<u64>>,
    first_errors: Mutex<Vec<String>>,
    /// Error kind (the message up to its second colon) → count.
    kinds: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Stats {
    fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        // The message without its numbers (ports, byte counts), OS error kept.
        let kind: String = e.chars().filter(|c| !c.is_ascii_digit()).take(90).collect();
        *self.kinds.lock().unwrap().entry(kind).or_default() += 1;
        let mut f = self.first_errors.lock().unwrap();
        if f.len() < 10 {
            f.push(e);
        }
    }

    fn requests(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed)
                + self.misses.load(Ordering::Relaxed)
                + self.tunnels.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }

    fn report(&self, phase: &str, elapsed: Duration, rss_start: u64, rss_end: u64) {
        let mut lat = std::mem::take(&mut *self.hit_latency_us.lock().unwrap());
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        let redials = self.redials.swap(0, Ordering::Relaxed);
        let (h, m, t, e) = (
            self.hits.swap(0, Ordering::Relaxed),
            self.misses.swap(0, Ordering::Relaxed),
            self.tunnels.swap(0, Ordering::Relaxed),
            self.errors.swap(0, Ordering::Relaxed),
        );
        println!(
            "{phase}: {:.0}s, requests {} (hits {h}, misses {m}, tunnels {t}), errors {e}, idle connections closed by stowage and redialled {redials}, hit latency p50 {:.2} ms p99 {:.2} ms max {:.0} ms, {:.0} req/s, stowage RSS {} -> {}, load {}",
            elapsed.as_secs_f64(),
            h + m + t,
            pct(0.50) as f64 / 1000.0,
            pct(0.99) as f64 / 1000.0,
            lat.last().copied().unwrap_or(0) as f64 / 1000.0,
            (h + m + t) as f64 / elapsed.as_secs_f64(),
            mib(rss_start),
            mib(rss_end),
            load(),
        );
        for (kind, n) in std::mem::take(&mut *self.kinds.lock().unwrap()) {
            println!("  errors of kind {kind:?}: {n}");
        }
        for e in self.first_errors.lock().unwrap().drain(..) {
            println!("  error: {e}");
        }
    }
}

async fn echo_server() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                // Out of descriptors: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// The fakes and the Stowage child process.
struct Env {
    registry: Arc<FakeRegistry>,
    echo_port: u16,
    client: Arc<ProxyClient>,
    child: std::process::Child,
    pid: u32,
    dir: tempfile::TempDir,
}

impl Env {
    async fn start(args: &Args, ca: &TestCa, extra_cache: &str) -> Env {
        let registry = Arc::new(FakeRegistry::builder(ca).host("quay.io").build().await);
        let echo_port = echo_server().await;
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let max_connections = args
            .max_connections
            .unwrap_or(args.connections + args.connections / 4 + 1000);
        // idle_timeout: the idle phase must not outlast it (default 2m).
        let config = format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\ntunnel_ports = [{echo_port}]\nmax_connections = {max_connections}\nidle_timeout = \"5m\"\n[ca]\ndir = \"{}\"\n[cache]\ndir = \"{}\"\nmax_size = \"{}\"\n{extra_cache}[upstream]\nextra_ca = [\"{}\"]\n[upstream.resolve]\n\"quay.io\" = \"127.0.0.1\"\n\"tunnel.test\" = \"127.0.0.1\"\n",
            dir.path().join("certs").display(),
            dir.path().join("cache").display(),
            args.max_size,
            ca.pem_path().display()
        );
        std::fs::write(dir.path().join("config.toml"), &config).unwrap();
        let log = std::fs::File::create(dir.path().join("stowage.log")).unwrap();
        let child = std::process::Command::new(&args.stowage)
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .env("RUST_LOG", &args.stowage_log)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {}: {e} (build it with cargo build --release)",
                    args.stowage
                )
            });
        let pid = child.id();
        let proxy: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut ca_pem = String::new();
        for _ in 0..100 {
            if let Ok(pem) = std::fs::read_to_string(dir.path().join("certs/ca.crt")) {
                if tokio::net::TcpStream::connect(proxy).await.is_ok() {
                    ca_pem = pem;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!ca_pem.is_empty(), "stowage did not start");
        println!(
            "stowage pid {pid}: max_connections {max_connections}, open files {}",
            max_open_files(pid)
        );
        Env {
            registry,
            echo_port,
            client: Arc::new(ProxyClient::via_proxy(proxy, &ca_pem)),
            child,
            pid,
            dir,
        }
    }

    /// Stops the child and prints what it logged at warn and above.
    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(self.dir.path().join("stowage.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        println!("stowage log: {} lines", lines.len());
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        for l in &lines {
            // `<time> <LEVEL> <span/target>: message`: count by level and message.
            let key: String = l
                .split_whitespace()
                .skip(1)
                .filter(|w| !w.contains('='))
                .take(8)
                .collect::<Vec<_>>()
                .join(" ");
            *kinds.entry(key).or_default() += 1;
        }
        for (k, n) in kinds.iter().take(20) {
            println!("  {n} x {k}");
        }
    }
}

/// Logs in on a new CONNECT tunnel. The harness panics on a failed token dance; that
/// becomes an error here instead of a lost task.
async fn session(client: &Arc<ProxyClient>, port: u16, repo: &str) -> Result<Session, String> {
    let tunnel = client
        .tunnel("quay.io", port, Alpn::Http11)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (c, repo) = (client.clone(), repo.to_owned());
    tokio::spawn(async move { Session::on(&c, tunnel, &repo, Alpn::Http11).await })
        .await
        .map_err(|e| format!("login: {e}"))
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let (soft, hard) = raise_fd_limit(args.nofile);
    common::tls::install_provider();
    println!(
        "load tool: RLIMIT_NOFILE soft {soft:?} hard {hard:?}; {} cores; load {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load()
    );
    let ca = TestCa::new();
    if args.slow_manifest_fills > 0 {
        slow_manifest_fills(&args, &ca).await;
    } else {
        connections(&args, &ca).await;
    }
}

async fn connections(args: &Args, ca: &TestCa) {
    let env = Env::start(args, ca, "").await;
    let (registry, client, pid, echo_port) = (&env.registry, &env.client, env.pid, env.echo_port);
    let hot: Vec<String> = (0..64)
        .map(|i| registry.push_blob("load/hot", pseudo_random(64 * 1024, i)))
        .collect();

    // Warm the hot set once.
    let s = session(client, registry.port(), "load/hot").await.unwrap();
    for d in &hot {
        let r = s.blob(d).await;
        assert_eq!(sha256_digest(&r.body), *d);
    }
    drop(s);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_start = rss_kib(pid);
    let ramp = args
        .ramp
        .unwrap_or(Duration::from_secs((args.connections as u64 / 500).max(3)));
    println!(
        "{} connections (set up over {}s), {}s idle, {}s held + {}s soak; mix: 80% hits (64 KiB), 10% misses, 10% tunnels, think {}-{} ms (offered ~{:.0} req/s); stowage RSS {} (VmRSS), {} fds, load {}",
        args.connections,
        ramp.as_secs(),
        args.idle.as_secs(),
        args.duration.as_secs(),
        args.soak.as_secs(),
        args.think.0,
        args.think.1,
        args.connections as f64 * 2000.0 / (args.think.0 + args.think.1) as f64,
        mib(rss_start),
        open_fds(pid),
        load()
    );

    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (go_tx, go_rx) = tokio::sync::watch::channel(args.idle.is_zero());
    let next_miss = Arc::new(AtomicU64::new(1_000_000));
    let held = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    let t_setup = Instant::now();
    for w in 0..args.connections {
        let (client, registry, stats, stop, hot, next_miss, held, failed) = (
            client.clone(),
            registry.clone(),
            stats.clone(),
            stop.clone(),
            hot.clone(),
            next_miss.clone(),
            held.clone(),
            failed.clone(),
        );
        let mut go = go_rx.clone();
        let think = args.think;
        let stagger = ramp.as_millis() as u64 * w as u64 / args.connections as u64;
        workers.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(stagger)).await;
            let mut session = match session(&client, registry.port(), "load/hot").await {
                Ok(s) => s,
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return stats.error(e);
                }
            };
            held.fetch_add(1, Ordering::Relaxed);
            let _ = go.wait_for(|go| *go).await;
            // Spread the first requests over one think time, not all at the same instant.
            tokio::time::sleep(Duration::from_millis((w as u64 * 7919) % think.1)).await;
            let mut x = w as u64 + 1;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let roll = (x >> 33) % 100;
                if roll < 80 {
                    let d = &hot[(x >> 40) as usize % hot.len()];
                    let t0 = Instant::now();
                    match session
                        .request_raw(http::Method::GET, &session.blob_path(d), &[])
                        .await
                    {
                        Ok(r)
                            if r.status == 200
                                && r.body_error.is_none()
                                && r.body.len() == 64 * 1024 =>
                        {
                            stats
                                .hit_latency_us
                                .lock()
                                .unwrap()
                                .push(t0.elapsed().as_micros() as u64);
                            stats.hits.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => stats.error(format!(
                            "hit: status {} x-cache {} body {} {:?}",
                            r.status,
                            r.x_cache(),
                            r.body.len(),
                            r.body_error
                        )),
                        Err(e) if e.contains("not ready: channel closed") => {
                            // Closed while idle, before this request was sent: redial.
                            stats.redials.fetch_add(1, Ordering::Relaxed);
                            match self::session(&client, registry.port(), "load/hot").await {
                                Ok(s) => session = s,
                                Err(e) => stats.error(format!("redial: {e}")),
                            }
                        }
                        Err(e) => stats.error(format!("hit: {e}")),
                    }
                } else if roll < 90 {
                    let n = next_miss.fetch_add(1, Ordering::Relaxed);
                    let data = pseudo_random(16 * 1024, n);
                    let d = registry.push_blob("load/hot", data);
                    match session
                        .request_raw(http::Method::GET, &session.blob_path(&d), &[])
                        .await
                    {
                        Ok(r)
                            if r.status == 200
                                && r.body_error.is_none()
                                && sha256_digest(&r.body) == d =>
                        {
                            stats.misses.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => stats.error(format!(
                            "miss: status {} body {} {:?}",
                            r.status,
                            r.body.len(),
                            r.body_error
                        )),
                        Err(e) if e.contains("not ready: channel closed") => {
                            stats.redials.fetch_add(1, Ordering::Relaxed);
                            match self::session(&client, registry.port(), "load/hot").await {
                                Ok(s) => session = s,
                                Err(e) => stats.error(format!("redial: {e}")),
                            }
                        }
                        Err(e) => stats.error(format!("miss: {e}")),
                    }
                    // Fetched once; the fake registry need not keep it (its memory would grow).
                    registry.delete_blob(&d);
                } else {
                    match client
                        .connect_raw(&format!("tunnel.test:{echo_port}"))
                        .await
                    {
                        Ok((mut s, status)) if status == 200 => {
                            let msg = pseudo_random(1024, x);
                            let mut back = vec![0u8; 1024];
                            let ok = s.write_all(&msg).await.is_ok()
                                && s.read_exact(&mut back).await.is_ok()
                                && back == msg;
                            if ok {
                                stats.tunnels.fetch_add(1, Ordering::Relaxed);
                            } else {
                                stats.error("tunnel: echo mismatch".into());
                            }
                        }
                        Ok((_, status)) => {
                            stats.error(format!("tunnel: CONNECT answered {status}"))
                        }
                        Err(e) => stats.error(format!("tunnel: {e}")),
                    }
                }
                // Think time keeps every connection open and busy without saturating 2 cores.
                let (lo, hi) = think;
                tokio::time::sleep(Duration::from_millis(lo + (x >> 40) % (hi - lo))).await;
            }
        }));
    }

    // Every connection logged in (or failed).
    let setup_bound = ramp + Duration::from_secs(120);
    while held.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < args.connections as u64
        && t_setup.elapsed() < setup_bound
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        registry.clear_requests();
    }
    println!(
        "connected: {} logged in, {} failed, after {:.1}s; stowage RSS {}, {} fds, load {}",
        held.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        t_setup.elapsed().as_secs_f64(),
        mib(rss_kib(pid)),
        open_fds(pid),
        load()
    );
    if !args.idle.is_zero() {
        let mut rss_idle = 0;
        let t_idle = Instant::now();
        while t_idle.elapsed() < args.idle {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss_idle = rss_kib(pid);
        }
        let n = held.load(Ordering::Relaxed).max(1);
        println!(
            "idle: {n} connections idle (TLS in CONNECT, HTTP/1.1 keep-alive) for {}s: stowage RSS {} -> {} (VmRSS), {:.1} KiB per idle connection, {} fds, load {}",
            args.idle.as_secs(),
            mib(rss_start),
            mib(rss_idle),
            rss_idle.saturating_sub(rss_start) as f64 / n as f64,
            open_fds(pid),
            load()
        );
        go_tx.send_replace(true);
    }

    let t0 = Instant::now();
    let mut rss_hold_max = 0;
    while t0.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_secs(5).min(args.duration.saturating_sub(t0.elapsed())))
            .await;
        registry.clear_requests();
        rss_hold_max = rss_hold_max.max(rss_kib(pid));
    }
    let rss_mid = rss_kib(pid);
    let n = held.load(Ordering::Relaxed);
    println!(
        "connections held at once: {n}; stowage {} fds",
        open_fds(pid)
    );
    println!(
        "active: {n} connections doing requests: stowage RSS {} -> {} (VmRSS; max {} in the phase), {:.1} KiB per active connection, load {}",
        mib(rss_start),
        mib(rss_mid),
        mib(rss_hold_max.max(rss_mid)),
        rss_mid.saturating_sub(rss_start) as f64 / n.max(1) as f64,
        load()
    );
    stats.report("held", t0.elapsed(), rss_start, rss_mid);
    let mut rss_max = rss_mid;
    if !args.soak.is_zero() {
        let t1 = Instant::now();
        let mut next_mark = Duration::from_secs(60);
        let mut trace = Vec::new();
        let mut last = (0, 0);
        while t1.elapsed() < args.soak {
            tokio::time::sleep(Duration::from_secs(5)).await;
            registry.clear_requests();
            let rss = rss_kib(pid);
            rss_max = rss_max.max(rss);
            if t1.elapsed() >= next_mark {
                let (req, err) = stats.requests();
                let line = format!(
                    "{:>4}s  RSS {:>8}  load {:>5}  {:>6.0} req/s  errors {}  fds {}",
                    next_mark.as_secs(),
                    mib(rss),
                    load(),
                    (req - last.0) as f64 / 60.0,
                    err - last.1,
                    open_fds(pid)
                );
                println!("soak {line}");
                trace.push(line);
                last = (req, err);
                next_mark += Duration::from_secs(60);
            }
        }
        let rss_end = rss_kib(pid);
        stats.report("soak", t1.elapsed(), rss_mid, rss_end);
        println!(
            "stowage RSS: start {}, after load {}, end of soak {}, max {}",
            mib(rss_start),
            mib(rss_mid),
            mib(rss_end),
            mib(rss_max)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
    }
    env.stop();
}

/// A valid OCI image manifest of exactly `size` bytes (a padding annotation), distinct
/// for each `i`.
fn padded_manifest(
    i: usize,
    size: usize,
    config: &(String, usize),
    layer: &(String, usize),
) -> Vec<u8> {
    let make = |pad: String| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.0, "size": config.1},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer.0, "size": layer.1}],
            "annotations": {"org.example.stowage.load.padding": pad},
        }))
        .unwrap()
    };
    let head = format!("{i:08}-");
    let bare = make(head.clone()).len();
    assert!(size > bare, "--manifest-size must exceed {bare} bytes");
    let m = make(head + &"x".repeat(size - bare));
    assert_eq!(m.len(), size);
    m
}

async fn slow_manifest_fills(args: &Args, ca: &TestCa) {
    let n = args.slow_manifest_fills;
    let size = args.manifest_size;
    let extra = format!("max_manifest_size = \"{size}B\"\n");
    let env = Env::start(args, ca, &extra).await;
    let (registry, client, pid) = (&env.registry, &env.client, env.pid);
    let layer = pseudo_random(1024, 7);
    let layer = (registry.push_blob("load/big", layer.clone()), layer.len());
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config = (
        registry.push_blob("load/big", config.to_vec()),
        config.len(),
    );
    let digests: Vec<String> = (0..n)
        .map(|i| {
            let m = padded_manifest(i, size, &config, &layer);
            registry.push_manifest("load/big", Some(&format!("m{i}")), m, OCI_MANIFEST)
        })
        .collect();
    registry.set_manifest_chunking(args.manifest_chunk, args.manifest_pause);
    let chunks = size.div_ceil(args.manifest_chunk);
    println!(
        "slow manifest fills: {n} distinct manifests of {size} bytes (max_manifest_size {size}B), sent {} bytes every {} ms (~{:.1}s each), {n} clients pulling by tag at once",
        args.manifest_chunk,
        args.manifest_pause.as_millis(),
        (chunks.saturating_sub(1)) as f64 * args.manifest_pause.as_secs_f64()
    );
    let rss_start = rss_kib(pid);
    let mut sessions = Vec::new();
    for _ in 0..n {
        sessions.push(session(client, registry.port(), "load/big").await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = rss_kib(pid);
    println!(
        "before: stowage RSS {} at start, {} with {n} clients connected and logged in (VmRSS), load {}",
        mib(rss_start),
        mib(rss_before),
        load()
    );

    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut pulls = Vec::new();
    for (i, (s, d)) in sessions.into_iter().zip(digests).enumerate() {
        let (errors, done) = (errors.clone(), done.clone());
        pulls.push(tokio::spawn(async move {
            let r = s
                .request_raw(
                    http::Method::GET,
                    &s.manifest_path(&format!("m{i}")),
                    &[("accept", OCI_MANIFEST)],
                )
                .await;
            let ok = match &r {
                Ok(r) => r.status == 200 && r.body_error.is_none() && sha256_digest(&r.body) == d,
                Err(_) => false,
            };
            // Every error counts; the first five are printed.
            if !ok && errors.fetch_add(1, Ordering::Relaxed) < 5 {
                match r {
                    Ok(r) => println!(
                        "  error: m{i}: status {} x-cache {} body {} {:?}",
                        r.status,
                        r.x_cache(),
                        r.body.len(),
                        r.body_error
                    ),
                    Err(e) => println!("  error: m{i}: {e}"),
                }
            }
            done.fetch_add(1, Ordering::Relaxed);
            drop(s);
        }));
    }
    let mut peak = (rss_before, Duration::ZERO);
    let mut first_done = None;
    let mut trace = Vec::new();
    let mut next_mark = Duration::from_secs(1);
    while done.load(Ordering::Relaxed) < n as u64 && t0.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rss = rss_kib(pid);
        if rss > peak.0 {
            peak = (rss, t0.elapsed());
        }
        if first_done.is_none() && done.load(Ordering::Relaxed) > 0 {
            first_done = Some(t0.elapsed());
        }
        if t0.elapsed() >= next_mark {
            trace.push(format!("{}s {}", next_mark.as_secs(), mib(rss)));
            next_mark += Duration::from_secs(1);
        }
    }
    for p in pulls {
        let _ = p.await;
    }
    let took = t0.elapsed();
    println!(
        "pulls: {n} in {:.1}s (first done at {:.1}s), errors {}; load {}",
        took.as_secs_f64(),
        first_done.unwrap_or(took).as_secs_f64(),
        errors.load(Ordering::Relaxed),
        load()
    );
    println!("during, each second: {}", trace.join(", "));
    println!(
        "peak: stowage RSS {} at {:.1}s (sampled every 100 ms; VmHWM {}), load {}",
        mib(peak.0),
        peak.1.as_secs_f64(),
        mib(status_kib(pid, "VmHWM")),
        load()
    );
    // Every client connection is closed by now (sessions dropped with their pulls).
    tokio::time::sleep(args.after).await;
    let rss_after = rss_kib(pid);
    println!(
        "after +{}s: stowage RSS {} (RssAnon {}), {} fds, load {}",
        args.after.as_secs(),
        mib(rss_after),
        mib(status_kib(pid, "RssAnon")),
        open_fds(pid),
        load()
    );
    tokio::time::sleep(args.after_more).await;
    let rss_more = rss_kib(pid);
    println!(
        "after +{}s: stowage RSS {} (RssAnon {}), load {}",
        (args.after + args.after_more).as_secs(),
        mib(rss_more),
        mib(status_kib(pid, "RssAnon")),
        load()
    );
    println!(
        "slow manifest fills: {n} x {size} B: RSS before {}, peak {}, +{}s {}, +{}s {}; errors {}",
        mib(rss_before),
        mib(peak.0),
        args.after.as_secs(),
        mib(rss_after),
        (args.after + args.after_more).as_secs(),
        mib(rss_more),
        errors.load(Ordering::Relaxed)
    );
    env.stop();
}
