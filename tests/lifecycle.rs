//! A cache that runs for months (issue 5): the size bound while serving, `kill -9` during
//! fills and restarts, write failures, `/metrics` over a miss and a hit, the `stowage cache`
//! commands on a stopped cache, and access times across restarts.
//!
//! Crash and CLI tests run the real binary (`CARGO_BIN_EXE_stowage`) as a child process
//! with its own config file: `listen = "127.0.0.1:0"`, and the bound address is read from
//! its `listening` log line. Everything else uses the in-process fixture.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};

/// Polls `/metrics` until `check` holds (the access-log body records a request when the
/// response body is dropped, a moment after the client has read it).
async fn metrics_until(client: &ProxyClient, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = client.proxy_get("/metrics").await.text();
        if check(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn total_size(cache: &Path) -> u64 {
    files_under(&cache.join("blobs"))
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// Every object under `blobs/sha256/<xx>/<hex>` hashes to its name; returns the digests.
fn assert_consistent(cache: &Path) -> Vec<String> {
    let mut digests = Vec::new();
    for p in files_under(&cache.join("blobs")) {
        let rel = p
            .strip_prefix(cache.join("blobs"))
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let parts: Vec<&str> = rel.split('/').collect();
        assert_eq!(parts.len(), 3, "unexpected file in the cache: {rel}");
        assert_eq!(parts[0], "sha256", "{rel}");
        assert!(
            parts[2].starts_with(parts[1]),
            "fan-out directory does not match: {rel}"
        );
        let d = format!("sha256:{}", parts[2]);
        assert_eq!(
            sha256_digest(&std::fs::read(&p).unwrap()),
            d,
            "cached object does not hash to its name: {rel}"
        );
        digests.push(d);
    }
    digests
}

// --- The real binary ----------------------------------------------------------------------

/// A cache, CA and config file for the `stowage` binary, outliving the processes run on it.
struct Instance {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Instance {
    fn new(ca: &TestCa, cache_lines: &str) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let q = |p: &Path| format!("{:?}", p.to_str().unwrap());
        let mut toml = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n\n[ca]\ndir = {}\n\n[cache]\ndir = {}\n{cache_lines}\n\n[upstream]\nextra_ca = [{}]\nconnect_timeout = \"2s\"\n\n[upstream.resolve]\n",
            q(&dir.path().join("certs")),
            q(&dir.path().join("cache")),
            q(ca.pem_path()),
        );
        for h in FAKE_HOSTS {
            toml.push_str(&format!("{h:?} = \"127.0.0.1\"\n"));
        }
        let config = dir.path().join("config.toml");
        std::fs::write(&config, toml).unwrap();
        Instance { dir, config }
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.cache().join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    fn temp_files(&self) -> Vec<PathBuf> {
        files_under(&self.cache().join("tmp"))
    }

    /// Starts `stowage --config ...` and waits for its proxy listener.
    fn start(&self) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stowage"))
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stowage");
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
        let addr = match rx.recv_timeout(BOUND) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "stowage did not report its listener; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let ca_pem = std::fs::read_to_string(self.dir.path().join("certs/ca.crt"))
            .expect("CA written at start");
        Proc {
            child,
            client: ProxyClient::via_proxy(addr, &ca_pem),
            addr,
            log,
        }
    }

    /// `stowage --config ... <args>` (the admin commands).
    fn cli(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        eprintln!(
            "$ stowage {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

struct Proc {
    child: Child,
    client: ProxyClient,
    /// The proxy listener (where `stowage cache ...` finds the server: `--listen`).
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// SIGKILL: no shutdown code runs.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }

    /// SIGTERM, and a clean exit within the bound.
    fn stop(mut self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "stowage exited with {status:?}; log:\n{}",
                    self.log.lock().unwrap().join("\n")
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "stowage did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// --- Tests --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_fills_then_restart_leaves_a_consistent_cache() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let done: Vec<String> = (0..3)
        .map(|i| quay.push_blob("team/app", pseudo_random(300_000, 100 + i)))
        .collect();
    let inflight: Vec<String> = (0..4)
        .map(|i| quay.push_blob("team/app", pseudo_random(2 << 20, 200 + i)))
        .collect();
    let inst = Instance::new(&ca, "");

    let p = inst.start();
    let s = Session::login(&p.client, "quay.io", quay.port(), "team/app", Alpn::H2).await;
    for d in &done {
        let r = bounded("pull", s.blob(d)).await;
        assert_eq!(sha256_digest(&r.body), *d);
    }
    eventually("first blobs stored", || {
        done.iter().all(|d| inst.blob_path(d).is_file())
    })
    .await;
    // Four fills in flight: upstream sent each head and first chunk, then waits.
    let gate = quay.hold_blob_bodies();
    let mut heads = Vec::new();
    for d in &inflight {
        heads.push(
            bounded(
                "in-flight head",
                s.tunnel.send(
                    Method::GET,
                    &s.blob_path(d),
                    &[("authorization", &format!("Bearer {}", s.token))],
                ),
            )
            .await
            .unwrap(),
        );
    }
    eventually("four temp files with data", || {
        let t = inst.temp_files();
        t.len() == 4
            && t.iter()
                .all(|f| std::fs::metadata(f).map(|m| m.len() > 0).unwrap_or(false))
    })
    .await;
    p.kill9();
    drop(heads);
    assert_eq!(
        inst.temp_files().len(),
        4,
        "the crash left its temp files (the restart must clear them)"
    );

    let p = inst.start();
    assert!(
        inst.temp_files().is_empty(),
        "temp files survived a restart: {:?}",
        inst.temp_files()
    );
    let mut cached = assert_consistent(&inst.cache());
    cached.sort();
    let mut want = done.clone();
    want.sort();
    assert_eq!(cached, want, "exactly the completed blobs survive");
    gate.open();
    let s = Session::login(&p.client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    for d in &done {
        let r = bounded("after restart", s.blob(d)).await;
        assert_eq!(r.x_cache(), "hit");
        assert_eq!(sha256_digest(&r.body), *d);
    }
    for d in &inflight {
        let r = bounded("after restart", s.blob(d)).await;
        assert_eq!(r.x_cache(), "miss", "an interrupted fill looked cached");
        assert_eq!(sha256_digest(&r.body), *d);
    }
    eventually("refetched blobs stored", || {
        inflight.iter().all(|d| inst.blob_path(d).is_file())
    })
    .await;
    assert_eq!(assert_consistent(&inst.cache()).len(), 7);

    // Again under churn: concurrent pulls, slow upstream, a cache small enough to evict all
    // the time; killed at whatever point it has reached.
    p.stop();
    let churn: Vec<String> = (0..10)
        .map(|i| quay.push_blob("team/app", pseudo_random(700_000, 300 + i)))
        .collect();
    std::fs::write(
        &inst.config,
        std::fs::read_to_string(&inst.config)
            .unwrap()
            .replace("[cache]\n", "[cache]\nmax_size = \"3MiB\"\n"),
    )
    .unwrap();
    quay.set_chunking(64 * 1024, Duration::from_millis(1));
    for round in 0..3u64 {
        let p = inst.start();
        let gets_before = quay.blob_gets();
        let logged_in = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let workers: Vec<_> = (0..3u64)
            .map(|w| {
                let (client, churn, port, logged_in) = (
                    p.client.clone(),
                    churn.clone(),
                    quay.port(),
                    logged_in.clone(),
                );
                tokio::spawn(async move {
                    let s = Session::login(&client, "quay.io", port, "team/app", Alpn::H2).await;
                    logged_in.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    for i in 0u64.. {
                        let d = &churn[((i * 7 + w * 3 + round) % 10) as usize];
                        match s.request_raw(Method::GET, &s.blob_path(d), &[]).await {
                            Ok(r) if r.body_error.is_none() => {
                                assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                                assert_eq!(sha256_digest(&r.body), *d, "wrong bytes served");
                            }
                            _ => return, // the process was killed under us
                        }
                    }
                })
            })
            .collect();
        eventually("workers logged in", || {
            logged_in.load(std::sync::atomic::Ordering::SeqCst) == 3
        })
        .await;
        let target = gets_before + 8 + round as usize * 3;
        eventually("the churn is under way", || quay.blob_gets() >= target).await;
        p.kill9();
        for w in workers {
            bounded("worker", w)
                .await
                .expect("a worker saw wrong bytes");
        }
        let p = inst.start();
        assert!(
            inst.temp_files().is_empty(),
            "round {round}: temp files survived a restart"
        );
        let survivors = assert_consistent(&inst.cache());
        let s = Session::login(&p.client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
        // Survivors first (misses would evict them), each a hit with the right bytes.
        for d in &survivors {
            let r = bounded("survivor after restart", s.blob(d)).await;
            assert_eq!(
                r.x_cache(),
                "hit",
                "round {round}: a surviving object was not served from the cache"
            );
            assert_eq!(sha256_digest(&r.body), *d);
        }
        for d in churn.iter().filter(|d| !survivors.contains(d)) {
            let r = bounded("after churn restart", s.blob(d)).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(
                sha256_digest(&r.body),
                *d,
                "round {round}: wrong bytes after a restart"
            );
        }
        eventually("the cache back under max_size", || {
            total_size(&inst.cache()) <= 3 << 20
        })
        .await;
        p.stop();
        assert_consistent(&inst.cache());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_cache_under_max_size_while_serving() {
    const MAX: u64 = 10 << 20;
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let big_data = pseudo_random(6 << 20, 40);
    let big = quay.push_blob("team/app", big_data.clone());
    let small: Vec<String> = (0..12)
        .map(|i| quay.push_blob("team/app", pseudo_random(1 << 20, 41 + i)))
        .collect();
    let stowage = Stowage::builder()
        .trust(&ca)
        .cache("max_size = \"10MiB\"")
        .start()
        .await;
    let client = stowage.client();
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;

    let t = client
        .tunnel("quay.io", quay.port(), Alpn::Http11)
        .await
        .unwrap();
    let auth = format!("Bearer {}", s.token);
    assert_eq!(bounded("big", s.blob(&big)).await.x_cache(), "miss");
    eventually("big stored", || stowage.is_cached(&big)).await;
    // A hit on the big blob starts right away (access times move at one-second steps, so it
    // stays the least recently used object); the client reads nothing yet.
    let serving = bounded(
        "big hit",
        t.send(Method::GET, &s.blob_path(&big), &[("authorization", &auth)]),
    )
    .await
    .unwrap();
    assert_eq!(serving.headers()["x-cache"], "hit");
    for d in &small[..4] {
        assert_eq!(bounded("small", s.blob(d)).await.x_cache(), "miss");
        eventually("small stored", || stowage.is_cached(d)).await;
    }
    assert_eq!(
        total_size(&stowage.cache_dir),
        10 << 20,
        "at max_size, not over it: nothing evicted yet"
    );
    assert!(stowage.is_cached(&big));
    // One more takes the cache over 10 MiB: the least recently used object (the big blob)
    // is evicted while it is being read.
    assert_eq!(bounded("small", s.blob(&small[4])).await.x_cache(), "miss");
    eventually("the big blob evicted", || !stowage.is_cached(&big)).await;
    eventually("under max_size", || total_size(&stowage.cache_dir) <= MAX).await;
    let r = client::read_response(serving).await;
    r.assert_complete();
    assert_eq!(
        sha256_digest(&r.body),
        big,
        "the blob being served was cut off or changed by its eviction"
    );

    // Serving on, the bound holds after every fill.
    for d in &small[5..] {
        let r = bounded("small", s.blob(d)).await;
        assert_eq!(sha256_digest(&r.body), *d);
        eventually("stored", || stowage.is_cached(d)).await;
        eventually("under max_size", || total_size(&stowage.cache_dir) <= MAX).await;
    }
    let m = metrics_until(&client, "evictions", |m| {
        metric(m, "stowage_evictions_total", &[]) >= 2.0
    })
    .await;
    assert!(
        metric(&m, "stowage_evicted_bytes_total", &[]) >= (6 << 20) as f64,
        "{m}"
    );
    assert!(
        metric(&m, "stowage_cache_size_bytes", &[]) <= MAX as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "stowage_cache_size_bytes", &[]),
        total_size(&stowage.cache_dir) as f64,
        "{m}"
    );

    // Evicted content is fetched again on demand.
    let gets = quay.blob_gets();
    let r = bounded("evicted big", s.blob(&big)).await;
    assert_eq!(r.x_cache(), "miss");
    assert_eq!(r.body, big_data);
    assert_eq!(quay.blob_gets(), gets + 1);
    eventually("refetched and stored", || stowage.is_cached(&big)).await;
    eventually("under max_size", || total_size(&stowage.cache_dir) <= MAX).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_over_a_miss_then_a_hit() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(123_456, 50);
    let len = data.len() as f64;
    let digest = quay.push_blob("team/app", data);
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::H2).await;
    // The registry label is the canonical registry: host and (non-443) port.
    let registry = format!("quay.io:{}", quay.port());
    let registry = registry.as_str();
    let req = |outcome: &'static str| {
        move |m: &str| {
            metric(
                m,
                "stowage_requests_total",
                &[
                    ("registry", registry),
                    ("kind", "blob"),
                    ("outcome", outcome),
                ],
            )
        }
    };
    let served = |source: &'static str| {
        move |m: &str| metric(m, "stowage_served_bytes_total", &[("source", source)])
    };

    let m0 = client.proxy_get("/metrics").await.text();
    assert!(
        m0.contains("# TYPE stowage_requests counter")
            || m0.contains("# TYPE stowage_requests_total counter"),
        "{m0}"
    );
    assert_eq!(req("miss")(&m0), 0.0);
    assert_eq!(metric(&m0, "stowage_cache_objects", &[]), 0.0);

    assert_eq!(bounded("miss", s.blob(&digest)).await.x_cache(), "miss");
    eventually("stored", || stowage.is_cached(&digest)).await;
    let m1 = metrics_until(&client, "the miss", |m| req("miss")(m) == 1.0).await;
    assert_eq!(
        served("upstream")(&m1) - served("upstream")(&m0),
        len,
        "{m1}"
    );
    assert_eq!(served("cache")(&m1), served("cache")(&m0), "{m1}");
    assert_eq!(req("hit")(&m1), 0.0);
    assert_eq!(metric(&m1, "stowage_cache_objects", &[]), 1.0, "{m1}");
    assert_eq!(metric(&m1, "stowage_cache_size_bytes", &[]), len, "{m1}");
    assert_eq!(metric(&m1, "stowage_fills_in_flight", &[]), 0.0, "{m1}");

    assert_eq!(bounded("hit", s.blob(&digest)).await.x_cache(), "hit");
    let m2 = metrics_until(&client, "the hit", |m| req("hit")(m) == 1.0).await;
    assert_eq!(req("miss")(&m2), 1.0, "{m2}");
    assert_eq!(served("cache")(&m2) - served("cache")(&m1), len, "{m2}");
    assert_eq!(
        served("upstream")(&m2),
        served("upstream")(&m1),
        "a hit counted upstream bytes: {m2}"
    );
    assert_eq!(
        metric(&m2, "stowage_upstream_errors_total", &[]),
        0.0,
        "{m2}"
    );
    assert_eq!(
        metric(&m2, "stowage_cache_write_errors_total", &[]),
        0.0,
        "{m2}"
    );
    assert!(
        metric(&m2, "stowage_certificates_minted_total", &[]) >= 1.0,
        "{m2}"
    );
    assert_eq!(quay.blob_gets(), 1);

    // The running server's stats (what `stowage cache stats` shows) agree.
    let stats = client.proxy_get("/admin/stats").await.json();
    assert_eq!(stats["objects"], 1);
    assert_eq!(stats["bytes"], len as u64);
    assert_eq!(stats["since_start"]["hits"], 1, "{stats}");
    assert_eq!(stats["since_start"]["misses"], 1, "{stats}");
    assert_eq!(stats["since_start"]["bytes_saved"], len as u64, "{stats}");
}

/// A blob is still delivered when the cache cannot be written: its temp directory made
/// unusable (a read-only or broken cache directory; root ignores permission bits, so the
/// directory is replaced by a file), then restored, and caching resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_cache_still_delivers_and_caching_resumes() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(700_000, 60);
    let digest = quay.push_blob("team/app", data.clone());
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let tmp = stowage.cache_dir.join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();

    for _ in 0..2 {
        let r = bounded("unwritable", s.blob(&digest)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, data, "the blob was not delivered whole");
        assert_eq!(r.x_cache(), "miss");
    }
    assert!(!stowage.is_cached(&digest));
    let m = metrics_until(&client, "write errors", |m| {
        metric(m, "stowage_cache_write_errors_total", &[]) >= 2.0
    })
    .await;
    assert_eq!(
        metric(
            &m,
            "stowage_cache_write_errors_total",
            &[("reason", "create")]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(quay.blob_gets(), 2);

    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    let r = bounded("writable again", s.blob(&digest)).await;
    assert_eq!(r.body, data);
    eventually("cached again", || stowage.is_cached(&digest)).await;
    assert_eq!(bounded("hit", s.blob(&digest)).await.x_cache(), "hit");
    assert_eq!(quay.blob_gets(), 3);
}

/// A small tmpfs mounted over a cache directory; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full disk, for real: the cache on an 8 MiB tmpfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_still_delivers_and_caching_resumes() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let inst = Instance::new(&ca, "min_free = \"512KiB\"");
    let Some(_fs) = Tmpfs::mount(&inst.cache(), "8m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root in a mount namespace)");
        return;
    };
    let p = inst.start();
    let s = Session::login(&p.client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let free = || {
        let st = rustix::fs::statvfs(inst.cache()).unwrap();
        st.f_bavail * st.f_frsize
    };
    // Larger than the free space: passed through whole, not cut off half-way.
    let huge = pseudo_random(free() as usize + (1 << 20), 61);
    let dh = quay.push_blob("team/app", huge.clone());
    let r = bounded("too big for the disk", s.blob(&dh)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), huge.len());
    assert!(r.body == huge, "wrong bytes");
    assert!(inst.temp_files().is_empty());
    assert!(!inst.blob_path(&dh).exists());
    let m = metrics_until(&p.client, "disk_full", |m| {
        metric(
            m,
            "stowage_cache_write_errors_total",
            &[("reason", "disk_full")],
        ) >= 1.0
    })
    .await;
    assert_eq!(metric(&m, "stowage_cache_objects", &[]), 0.0);

    // Space for a smaller one: caching goes on.
    let small = pseudo_random(1 << 20, 62);
    let ds = quay.push_blob("team/app", small.clone());
    assert_eq!(bounded("fits", s.blob(&ds)).await.body, small);
    eventually("the small blob cached", || inst.blob_path(&ds).is_file()).await;

    // The disk fills up during a fill (another writer took the space): the download is
    // still delivered whole (the rest relayed from upstream), the temp file goes, and
    // nothing of it is cached.
    let mid = pseudo_random(3 << 20, 63);
    let dm = quay.push_blob("team/app", mid.clone());
    let gate = quay.hold_blob_bodies();
    let head = bounded(
        "mid head",
        s.tunnel.send(
            Method::GET,
            &s.blob_path(&dm),
            &[("authorization", &format!("Bearer {}", s.token))],
        ),
    )
    .await
    .unwrap();
    eventually("the fill started", || inst.temp_files().len() == 1).await;
    let filler = inst.cache().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; free() as usize]);
    gate.open();
    let r = client::read_response(head).await;
    r.assert_complete();
    assert!(
        r.body == mid,
        "the fill the disk could not take was not delivered whole"
    );
    eventually("the failed fill's temp file removed", || {
        inst.temp_files().is_empty()
    })
    .await;
    assert!(!inst.blob_path(&dm).exists());
    let m = metrics_until(&p.client, "disk full", |m| {
        metric(
            m,
            "stowage_cache_write_errors_total",
            &[("reason", "disk_full")],
        ) >= 2.0
    })
    .await;
    assert_eq!(
        metric(&m, "stowage_digest_mismatches_total", &[]),
        0.0,
        "{m}"
    );
    // While the disk stays full, the next pull is passed through.
    let r = bounded("retry", s.blob(&dm)).await;
    assert_eq!(r.x_cache(), "miss");
    assert!(r.body == mid, "the retry was not delivered whole");
    std::fs::remove_file(&filler).unwrap();
    assert_consistent(&inst.cache());
    p.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_commands_on_a_stopped_cache() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image(
        "team/app",
        "v1",
        &[pseudo_random(400_000, 70), pseudo_random(200_000, 71)],
    );
    let inst = Instance::new(&ca, "");
    let p = inst.start();
    pull(
        &p.client,
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::H2,
    )
    .await;
    let all: Vec<String> = std::iter::once(img.manifest.clone())
        .chain(img.blobs())
        .collect();
    eventually("image stored", || {
        all.iter().all(|d| inst.blob_path(d).is_file())
    })
    .await;
    p.stop();
    let total = total_size(&inst.cache());

    let o = inst.cli(&["cache", "stats"]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(text.contains("server not running"), "{text}");
    assert!(text.contains("objects:  4"), "{text}");
    let o = inst.cli(&["cache", "stats", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["objects"], 4);
    assert_eq!(v["bytes"], total);

    let o = inst.cli(&["cache", "ls"]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(
        text.contains("quay.io") && text.contains("team/app:v1"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&inst.cli(&["cache", "ls", "--json"]).stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        v[0]["registry"],
        format!("quay.io:{}", quay.port()).as_str()
    );
    assert_eq!(v[0]["repository"], "team/app");
    assert_eq!(v[0]["tag"], "v1");
    assert_eq!(v[0]["digest"], img.manifest.as_str());
    assert_eq!(v[0]["cached_bytes"], total);
    assert_eq!(v[0]["missing"], 0);

    // Corrupt a layer in place (same length): verify finds it and removes it.
    let bad = &img.layers[0];
    let mut bytes = std::fs::read(inst.blob_path(bad)).unwrap();
    bytes[1000] ^= 0x55;
    std::fs::write(inst.blob_path(bad), &bytes).unwrap();
    let o = inst.cli(&["cache", "verify"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "verify reports corruption in its exit status"
    );
    let text = stdout(&o);
    assert!(
        text.contains(&format!("corrupt: {bad} (removed)")),
        "{text}"
    );
    assert!(
        text.contains("verified 4 objects") && text.contains("1 corrupt and removed"),
        "{text}"
    );
    assert!(
        !inst.blob_path(bad).exists(),
        "the corrupt file is still there"
    );
    assert_eq!(assert_consistent(&inst.cache()).len(), 3);
    let o = inst.cli(&["cache", "verify"]);
    assert!(o.status.success(), "a clean cache verifies");
    assert!(
        stdout(&o).contains("verified 3 objects") && stdout(&o).contains("0 corrupt"),
        "{}",
        stdout(&o)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&inst.cli(&["cache", "ls", "--json"]).stdout).unwrap();
    assert_eq!(v[0]["missing"], 1, "{v}");

    // Prune to a size: least recently used objects go until it fits.
    let o = inst.cli(&["cache", "prune"]);
    assert!(!o.status.success(), "prune without a limit must refuse");
    let limit = total_size(&inst.cache()) - 1;
    let o = inst.cli(&["cache", "prune", "--max-size", &format!("{limit}B")]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("removed "), "{}", stdout(&o));
    assert!(!stdout(&o).starts_with("removed 0 "), "{}", stdout(&o));
    assert!(total_size(&inst.cache()) <= limit);
    let left = assert_consistent(&inst.cache()).len();
    let v: serde_json::Value =
        serde_json::from_slice(&inst.cli(&["cache", "stats", "--json"]).stdout).unwrap();
    assert_eq!(v["objects"], left as u64, "metadata agrees with the disk");

    // The server comes back and serves everything right, refetching what is gone.
    let p = inst.start();
    let again = pull(
        &p.client,
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(
        again.blobs[1].1.x_cache(),
        "miss",
        "the corrupt layer is fetched again"
    );
    eventually("image stored again", || {
        all.iter().all(|d| inst.blob_path(d).is_file())
    })
    .await;
    p.stop();
    assert_eq!(assert_consistent(&inst.cache()).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_times_survive_a_restart() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let a = quay.push_blob("team/app", pseudo_random(100_000, 80));
    let b = quay.push_blob("team/app", pseudo_random(100_000, 81));
    let inst = Instance::new(&ca, "");
    let p = inst.start();
    let s = Session::login(&p.client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    bounded("a", s.blob(&a)).await;
    eventually("a stored", || inst.blob_path(&a).is_file()).await;
    bounded("b", s.blob(&b)).await;
    eventually("b stored", || inst.blob_path(&b).is_file()).await;
    // Access times are kept at one-second granularity: let the clock pass it (not a
    // synchronisation sleep), then use `a` again. On disk `a` stays the older file.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(bounded("a again", s.blob(&a)).await.x_cache(), "hit");
    p.stop();
    let mtime = |d: &str| {
        std::fs::metadata(inst.blob_path(d))
            .unwrap()
            .modified()
            .unwrap()
    };
    assert!(mtime(&a) < mtime(&b));

    // Room for one: the least recently *used* (b) goes, which only persisted access times
    // can tell (file times say a is older).
    let o = inst.cli(&["cache", "prune", "--max-size", "150000B"]);
    assert!(o.status.success());
    assert!(
        inst.blob_path(&a).is_file(),
        "the recently used blob was pruned: access times were lost"
    );
    assert!(!inst.blob_path(&b).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_survive_eviction_and_forget_and_history_follow_a_retag() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let port = quay.port();
    let a = quay.push_image("pub/a", "1", &[pseudo_random(200_000, 91)]);
    let b = quay.push_image("pub/b", "1", &[pseudo_random(200_000, 92)]);
    let inst = Instance::new(&ca, "");
    let p = inst.start();
    let listen = p.addr.to_string();
    let cli = |args: &[&str]| {
        let mut all = vec!["--listen", listen.as_str()];
        all.extend_from_slice(args);
        let o = inst.cli(&all);
        assert!(o.status.success(), "stowage {args:?} failed");
        stdout(&o)
    };
    // a first: without its pin, the least recently used image and the first to go.
    pull(&p.client, "quay.io", port, "pub/a", "1", Alpn::Http11).await;
    for d in a.blobs() {
        eventually("a stored", || inst.blob_path(&d).is_file()).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await; // access times: 1 s granularity
    pull(&p.client, "quay.io", port, "pub/b", "1", Alpn::Http11).await;
    for d in b.blobs() {
        eventually("b stored", || inst.blob_path(&d).is_file()).await;
    }
    let a_ref = format!("quay.io:{port}/pub/a:1");
    assert!(cli(&["cache", "pin", &a_ref]).contains("pinned"));
    assert!(cli(&["cache", "pin", &a_ref]).contains("already pinned"));

    // Room for one image: b (used more recently) is evicted, pinned a stays.
    cli(&["cache", "prune", "--max-size", "300000B"]);
    for d in a.blobs() {
        assert!(inst.blob_path(&d).is_file(), "pinned {d} was evicted");
    }
    assert!(
        !inst.blob_path(&b.layers[0]).exists(),
        "b's layer was not evicted"
    );
    let ls = cli(&["cache", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.contains("pub/a:1") && l.ends_with("pinned")),
        "{ls}"
    );
    assert!(cli(&["cache", "stats"]).contains("pinned:"));
    // Unpinned, it goes like any other.
    assert!(cli(&["cache", "unpin", &a_ref]).contains("unpinned"));
    cli(&["cache", "prune", "--max-size", "0B"]);
    assert!(!inst.blob_path(&a.layers[0]).exists());

    // Upstream retags a; forget makes the next pull ask upstream (the tag is fresh for
    // five minutes otherwise), which gets the new image; history has both digests.
    let a2 = quay.push_image("pub/a", "1", &[pseudo_random(1_000, 93)]);
    assert!(cli(&["cache", "forget", &a_ref]).contains("forgot"));
    let seen = quay.requests().len();
    let pulled = pull(&p.client, "quay.io", port, "pub/a", "1", Alpn::Http11).await;
    assert_eq!(pulled.manifest_digest, a2.manifest);
    assert!(
        quay.requests()[seen..]
            .iter()
            .any(|r| r.method == Method::GET && r.path.ends_with("/pub/a/manifests/1")),
        "the pull after forget did not ask upstream"
    );
    let history = cli(&["cache", "history", &a_ref]);
    let (first, second) = (
        history
            .find(&a.manifest)
            .expect("the first digest in history"),
        history
            .find(&a2.manifest)
            .expect("the second digest in history"),
    );
    assert!(first < second, "{history}");
    // refresh: unchanged while upstream agrees; after a retag upstream, old → new, and the
    // next pull (tag fresh again) gets the new image without asking.
    let refreshed = cli(&["cache", "refresh", &a_ref]);
    assert!(
        refreshed.contains(&format!("unchanged ({})", a2.manifest)),
        "{refreshed}"
    );
    let a3 = quay.push_image("pub/a", "1", &[pseudo_random(1_000, 94)]);
    let refreshed = cli(&["cache", "refresh", &a_ref]);
    assert!(
        refreshed.contains(&format!("{} → {}", a2.manifest, a3.manifest)),
        "{refreshed}"
    );
    let seen = quay.requests().len();
    let pulled = pull(&p.client, "quay.io", port, "pub/a", "1", Alpn::Http11).await;
    assert_eq!(pulled.manifest_digest, a3.manifest);
    assert!(
        !quay.requests()[seen..]
            .iter()
            .any(|r| r.path.ends_with("/pub/a/manifests/1")),
        "the tag was not refreshed: the pull asked upstream"
    );
    assert!(cli(&["cache", "history", &a_ref]).contains(&a3.manifest));
    // A digest names no tag: forget refuses it clearly.
    let o = inst.cli(&[
        "--listen",
        &listen,
        "cache",
        "forget",
        &format!("quay.io:{port}/pub/a@{}", a2.manifest),
    ]);
    assert!(!o.status.success());
    p.stop();
}
