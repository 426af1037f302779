//! Load and soak test for Stowage (`cargo run --release --example load -- --help`).
//!
//! Starts, all on loopback: the in-process fake registry from the test harness (TLS, token
//! auth), a TCP echo server for blind tunnels, and the real `stowage` binary as a child
//! process. Then holds N client connections (CONNECT + TLS + HTTP/1.1 keep-alive, each with
//! its own token) doing a mix of cache hits, cache misses (fresh blobs pushed upstream on
//! the fly) and blind tunnels for a bounded time, followed by a soak. Reports requests,
//! errors, hit latency percentiles, and Stowage's RSS at start and end.
//!
//! Bounded in count and time; stops by itself; never leaves loopback.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{pseudo_random, sha256_digest, Alpn, FakeRegistry, ProxyClient, Session, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    connections: usize,
    duration: Duration,
    soak: Duration,
    stowage: String,
    max_size: String,
}

fn parse_args() -> Args {
    let mut a = Args {
        connections: 1000,
        duration: Duration::from_secs(60),
        soak: Duration::from_secs(300),
        stowage: "target/release/stowage".into(),
        max_size: "256MiB".into(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--connections" => a.connections = v.parse().expect("--connections N"),
            "--duration" => {
                a.duration = Duration::from_secs(v.parse().expect("--duration SECONDS"))
            }
            "--soak" => a.soak = Duration::from_secs(v.parse().expect("--soak SECONDS")),
            "--stowage" => a.stowage = v,
            "--max-size" => a.max_size = v,
            "--help" | "-h" => {
                println!("load [--connections 1000] [--duration 60] [--soak 300] [--stowage target/release/stowage] [--max-size 256MiB]");
                println!("  --max-size is Stowage's [cache] max_size: small enough that the misses keep the evictor busy");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    let max = cur.maximum.unwrap_or(1 << 20);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(max.min(1 << 20)),
            maximum: cur.maximum,
        },
    );
}

#[derive(Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    tunnels: AtomicU64,
    errors: AtomicU64,
    hit_latency_us: Mutex<Vec<u64>>,
    first_errors: Mutex<Vec<String>>,
}

impl Stats {
    fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_errors.lock().unwrap();
        if f.len() < 10 {
            f.push(e);
        }
    }

    fn report(&self, phase: &str, elapsed: Duration, rss_start: u64, rss_end: u64) {
        let mut lat = std::mem::take(&mut *self.hit_latency_us.lock().unwrap());
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        let (h, m, t, e) = (
            self.hits.swap(0, Ordering::Relaxed),
            self.misses.swap(0, Ordering::Relaxed),
            self.tunnels.swap(0, Ordering::Relaxed),
            self.errors.swap(0, Ordering::Relaxed),
        );
        println!(
            "{phase}: {:.0}s, requests {} (hits {h}, misses {m}, tunnels {t}), errors {e}, hit latency p50 {:.2} ms p99 {:.2} ms, {:.0} req/s, stowage RSS {} MiB -> {} MiB",
            elapsed.as_secs_f64(),
            h + m + t,
            pct(0.50) as f64 / 1000.0,
            pct(0.99) as f64 / 1000.0,
            (h + m + t) as f64 / elapsed.as_secs_f64(),
            rss_start / 1024,
            rss_end / 1024,
        );
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

#[tokio::main]
async fn main() {
    let args = parse_args();
    raise_fd_limit();
    common::tls::install_provider();
    let ca = TestCa::new();
    let registry = Arc::new(FakeRegistry::builder(&ca).host("quay.io").build().await);
    let echo_port = echo_server().await;
    let hot: Vec<String> = (0..64)
        .map(|i| registry.push_blob("load/hot", pseudo_random(64 * 1024, i)))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\ntunnel_ports = [{echo_port}]\nmax_connections = 10000\n[ca]\ndir = \"{}\"\n[cache]\ndir = \"{}\"\nmax_size = \"{}\"\n[upstream]\nextra_ca = [\"{}\"]\n[upstream.resolve]\n\"quay.io\" = \"127.0.0.1\"\n\"tunnel.test\" = \"127.0.0.1\"\n",
        dir.path().join("certs").display(),
        dir.path().join("cache").display(),
        args.max_size,
        ca.pem_path().display()
    );
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    let mut child = std::process::Command::new(&args.stowage)
        .arg("--config")
        .arg(dir.path().join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
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
    let client = Arc::new(ProxyClient::via_proxy(proxy, &ca_pem));

    // Warm the hot set once.
    let s = Session::login(
        &client,
        "quay.io",
        registry.port(),
        "load/hot",
        Alpn::Http11,
    )
    .await;
    for d in &hot {
        let r = s.blob(d).await;
        assert_eq!(sha256_digest(&r.body), *d);
    }
    let rss_start = rss_kib(pid);
    println!(
        "stowage pid {pid}, {} connections, {}s held + {}s soak; mix: 80% hits (64 KiB), 10% misses, 10% tunnels",
        args.connections,
        args.duration.as_secs(),
        args.soak.as_secs()
    );

    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let next_miss = Arc::new(AtomicU64::new(1_000_000));
    let held = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..args.connections {
        let (client, registry, stats, stop, hot, next_miss, held) = (
            client.clone(),
            registry.clone(),
            stats.clone(),
            stop.clone(),
            hot.clone(),
            next_miss.clone(),
            held.clone(),
        );
        workers.push(tokio::spawn(async move {
            // Stagger connection set-up.
            tokio::time::sleep(Duration::from_millis((w as u64 * 7) % 3000)).await;
            let tunnel = match client
                .tunnel("quay.io", registry.port(), Alpn::Http11)
                .await
            {
                Ok(t) => t,
                Err(e) => return stats.error(format!("connect: {e}")),
            };
            // The harness panics on a failed token dance; count it instead of losing a worker.
            let c = client.clone();
            let session = match tokio::spawn(async move {
                Session::on(&c, tunnel, "load/hot", Alpn::Http11).await
            })
            .await
            {
                Ok(s) => s,
                Err(e) => return stats.error(format!("login: {e}")),
            };
            held.fetch_add(1, Ordering::Relaxed);
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
                tokio::time::sleep(Duration::from_millis(150 + (x >> 50) % 300)).await;
            }
        }));
    }

    let t0 = Instant::now();
    while t0.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_secs(5).min(args.duration.saturating_sub(t0.elapsed())))
            .await;
        registry.clear_requests();
    }
    let rss_mid = rss_kib(pid);
    println!("connections held at once: {}", held.load(Ordering::Relaxed));
    stats.report("held", t0.elapsed(), rss_start, rss_mid);
    let mut rss_max = rss_mid;
    if !args.soak.is_zero() {
        let t1 = Instant::now();
        let mut next_mark = Duration::from_secs(60);
        let mut trace = Vec::new();
        while t1.elapsed() < args.soak {
            tokio::time::sleep(Duration::from_secs(5)).await;
            registry.clear_requests();
            let rss = rss_kib(pid);
            rss_max = rss_max.max(rss);
            if t1.elapsed() >= next_mark {
                trace.push(format!("{}s {} MiB", next_mark.as_secs(), rss / 1024));
                next_mark += Duration::from_secs(60);
            }
        }
        // Growth that levels off (allocator warm-up) reads differently from a leak.
        println!("soak RSS each minute: {}", trace.join(", "));
        let rss_end = rss_kib(pid);
        stats.report("soak", t1.elapsed(), rss_mid, rss_end);
        println!(
            "stowage RSS: start {} MiB, after load {} MiB, end of soak {} MiB, max {} MiB",
            rss_start / 1024,
            rss_mid / 1024,
            rss_end / 1024,
            rss_max / 1024
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}
