//! The `stowage` command as a user meets it (issue 20): each test runs the real binary
//! (`CARGO_BIN_EXE_stowage`) in a temporary working directory, so the repository's own
//! `config.toml` and `./cache` are never picked up, with `RUST_BACKTRACE=1` set as it is on
//! many developer machines. Servers are the binary too, on `127.0.0.1:0`; their address is
//! read from the `listening` log line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `stowage` run in `cwd`, with a backtrace asked for.
fn stowage(cwd: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stowage"));
    c.current_dir(cwd)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A user error: exit code 1, one `error: ...` message, nothing for developers.
fn assert_user_error(o: &Output, what: &str) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{what}: {err}");
    assert!(err.contains("error: "), "{what}: {err}");
    for noise in ["backtrace", "Backtrace", "Caused by", "panicked"] {
        assert!(!err.contains(noise), "{what} printed {noise:?}:\n{err}");
    }
    err
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.to_str().expect("utf-8 temp path"))
}

/// A config file in `dir` with the proxy on `127.0.0.1:0`, cache and CA inside `dir`, and
/// `extra` appended (it may name further tables).
fn config(dir: &Path, proxy_lines: &str, extra: &str) -> PathBuf {
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n{proxy_lines}\n[ca]\ndir = {}\n\n[cache]\ndir = {}\n\n{extra}\n",
        toml_path(&dir.join("certs")),
        toml_path(&dir.join("cache")),
    );
    let path = dir.join("stowage.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A `stowage` server process; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `stowage --config config` in `cwd` and waits for its proxy listener.
    fn start(cwd: &Path, config: &Path) -> Server {
        Self::start_with(cwd, config, &[])
    }

    fn start_with(cwd: &Path, config: &Path, env: &[(&str, &str)]) -> Server {
        let mut cmd = stowage(cwd);
        cmd.arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn stowage");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("listening") && line.contains("proxy") {
                    if let Some(addr) = first_addr(&line) {
                        let _ = tx.send(addr);
                    }
                }
                l.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("stowage did not start:\n{}", log.lock().unwrap().join("\n"));
            }
        };
        Server { child, addr, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line holds `needle`; returns it.
    fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first `127.0.0.1:<port>` in a log line.
fn first_addr(line: &str) -> Option<SocketAddr> {
    let i = line.find("127.0.0.1:")?;
    let port: String = line[i + 10..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    format!("127.0.0.1:{port}").parse().ok()
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

// --- 1. Errors ----------------------------------------------------------------------------

#[test]
fn user_errors_print_one_line_and_no_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let o = stowage(dir.path())
        .args(["setup", "bogus"])
        .output()
        .unwrap();
    let err = assert_user_error(&o, "setup bogus");
    assert!(err.contains("unknown runtime \"bogus\""), "{err}");

    let o = stowage(dir.path())
        .args(["cache", "prune"])
        .output()
        .unwrap();
    let err = assert_user_error(&o, "cache prune");
    assert!(err.contains("--max-size"), "{err}");

    // An unknown key: named, with the file it is in.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[proxy]\nlisen = \"127.0.0.1:1\"\n").unwrap();
    let o = stowage(dir.path())
        .arg("--config")
        .arg(&bad)
        .args(["cache", "stats"])
        .output()
        .unwrap();
    let err = assert_user_error(&o, "unknown key");
    assert!(err.contains("lisen"), "{err}");
    assert!(err.contains(bad.to_str().unwrap()), "names the file: {err}");

    // An I/O error is said once, not again as its own cause.
    let missing = dir.path().join("missing.toml");
    let o = stowage(dir.path())
        .arg("--config")
        .arg(&missing)
        .output()
        .unwrap();
    let err = assert_user_error(&o, "missing config");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
}

#[test]
fn a_bind_error_names_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = config(
        dir.path(),
        "",
        &format!("[mirror]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let o = stowage(dir.path())
        .arg("--config")
        .arg(&cfg)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = assert_user_error(&o, "mirror port taken");
    assert!(
        err.contains(&format!(
            "[mirror] listen 127.0.0.1:{port}: address already in use"
        )),
        "{err}"
    );
    assert!(!err.contains("os error 98"), "{err}");
}

#[test]
fn a_ca_dir_that_is_a_file_is_said_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("certs");
    std::fs::write(&file, "not a directory").unwrap();
    let o = stowage(dir.path())
        .arg("--ca-dir")
        .arg(&file)
        .args(["ca", "export"])
        .output()
        .unwrap();
    let err = assert_user_error(&o, "ca dir is a file");
    assert!(err.contains("not a directory"), "{err}");
    assert!(err.contains(file.to_str().unwrap()), "{err}");
    assert!(!err.contains("os error"), "{err}");
}

#[test]
fn a_second_server_on_one_cache_names_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", "");
    let first = Server::start(dir.path(), &cfg);
    let o = stowage(dir.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = assert_user_error(&o, "second server");
    assert!(
        err.contains(&format!("in use by another Stowage (pid {})", first.pid())),
        "{err}"
    );
    assert!(!err.contains("Cannot acquire lock"), "{err}");
}

// --- 2. Read-only commands do not write -------------------------------------------------

#[test]
fn inspecting_a_missing_cache_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in [
        &["cache", "stats"][..],
        &["cache", "ls"],
        &["cache", "verify"],
    ] {
        // No config: the built-in defaults, `./cache` in the working directory, and no
        // server on 127.0.0.1:3128 is assumed; --listen points at a closed port to be sure.
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let o = stowage(dir.path())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(cmd)
            .output()
            .unwrap();
        let err = assert_user_error(&o, &cmd.join(" "));
        assert!(err.contains("no cache at cache"), "{cmd:?}: {err}");
        assert!(
            !dir.path().join("cache").exists(),
            "{cmd:?} created ./cache: {err}"
        );
    }
}

// --- 3. Flags are honoured --------------------------------------------------------------

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

/// A cache at `cache` holding `n` small objects (written as files; the index is a scan),
/// the first `corrupt` of them with bytes that do not hash to their names. Returns their
/// digests.
fn fill_cache(cache: &Path, n: usize, corrupt: usize) -> Vec<String> {
    drop(stowage::cache::BlobStore::open(cache).unwrap());
    (0..n)
        .map(|i| {
            let data = format!("object {i}");
            let hex = sha256_hex(data.as_bytes());
            let dir = cache.join("blobs/sha256").join(&hex[..2]);
            std::fs::create_dir_all(&dir).unwrap();
            let bytes = if i < corrupt {
                format!("bit rot {i}")
            } else {
                data
            };
            std::fs::write(dir.join(&hex), bytes).unwrap();
            format!("sha256:{hex}")
        })
        .collect()
}

#[test]
fn cache_dir_is_honoured_while_a_server_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", "");
    let server = Server::start(dir.path(), &cfg);
    let other = dir.path().join("other");
    fill_cache(&other, 3, 0);
    let listen = server.addr.to_string();
    let run = |extra: &[&str]| {
        stowage(dir.path())
            .arg("--config")
            .arg(&cfg)
            .args(["--listen", &listen])
            .args(extra)
            .output()
            .unwrap()
    };
    let other_flag = other.to_str().unwrap();
    let o = run(&["--cache-dir", other_flag, "cache", "stats", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["objects"], 3, "{stats}");
    assert!(
        stats["since_start"].is_null(),
        "the server's numbers: {stats}"
    );

    let o = run(&["--cache-dir", other_flag, "cache", "stats"]);
    let text = stdout(&o);
    assert!(text.contains("objects:  3"), "{text}");
    assert!(
        text.contains("read directly") && !text.contains("(server running"),
        "{text}"
    );

    // The server's own cache still goes through the server.
    let o = run(&["cache", "stats", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["objects"], 0, "{stats}");
    assert!(!stats["since_start"].is_null(), "{stats}");
}

// --- 4. A bounded wait, and only Stowage is believed ---------------------------------------

#[test]
fn a_server_that_never_answers_fails_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    // The kernel completes the handshake; nobody ever reads or answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let started = Instant::now();
    let mut child = stowage(dir.path())
        .args(["--listen", &addr.to_string(), "cache", "stats"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cache stats still waiting after 30 s on a listener that never answers");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(1));
    let err = assert_user_error(&o, "silent server");
    assert!(
        err.contains("did not answer") && err.contains("10s"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    drop(silent);
}

#[test]
fn a_foreign_http_server_is_not_taken_for_stowage() {
    let dir = tempfile::tempdir().unwrap();
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = web.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in web.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let page = "<html><body>It works!</body></html>";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    for cmd in [
        &["cache", "stats"][..],
        &["cache", "ls"],
        &["cache", "verify"],
    ] {
        let o = stowage(dir.path())
            .args(["--listen", &addr.to_string()])
            .args(cmd)
            .output()
            .unwrap();
        let err = assert_user_error(&o, "foreign server");
        assert!(err.contains("not a Stowage admin API"), "{cmd:?}: {err}");
        assert!(err.contains("text/html"), "{cmd:?}: {err}");
        assert!(
            !err.contains("<html") && !stdout(&o).contains("<html"),
            "{err}"
        );
    }
}

// --- 5. Sizes ---------------------------------------------------------------------------

#[test]
fn sizes_need_a_unit_and_may_have_decimals() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sizes.toml");
    std::fs::write(&cfg, "[cache]\nmax_size = 50\n").unwrap();
    let o = stowage(dir.path())
        .arg("--config")
        .arg(&cfg)
        .args(["setup", "ca"])
        .output()
        .unwrap();
    let err = assert_user_error(&o, "max_size = 50");
    assert!(
        err.contains("\"50GiB\"") && err.contains("max_size"),
        "{err}"
    );

    std::fs::write(&cfg, "[cache]\nmax_size = \"1.5GiB\"\n").unwrap();
    let o = stowage(dir.path())
        .arg("--config")
        .arg(&cfg)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--listen")
        .arg("127.0.0.1:1")
        .args(["cache", "stats", "--json"])
        .output()
        .unwrap();
    // Accepted: the only complaint is that no cache exists yet.
    let err = stderr(&o);
    assert!(err.contains("no cache at"), "{err}");

    // The command line reads sizes the same way.
    let o = stowage(dir.path())
        .args(["cache", "prune", "--max-size", "20"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(err.contains("\"20GiB\""), "{err}");
    assert_eq!(o.status.code(), Some(2), "a usage error: {err}");
}

// --- 6. cache ls after a prune ----------------------------------------------------------

/// A cache holding one image (manifest, config, one layer) tagged `quay.io/org/app:v1`.
fn cache_with_one_image(cache: &Path) {
    use stowage::oci::Digest;
    let digest = |b: &[u8]| -> Digest { format!("sha256:{}", sha256_hex(b)).parse().unwrap() };
    let store = stowage::cache::BlobStore::open(cache).unwrap();
    let layer = vec![7u8; 5000];
    let config = b"{}".to_vec();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": digest(&config).to_string(), "size": 2},
        "layers": [{"digest": digest(&layer).to_string(), "size": 5000}],
    })
    .to_string();
    let md = digest(manifest.as_bytes());
    store.put(&digest(&layer), &layer).unwrap();
    store.put(&digest(&config), &config).unwrap();
    store.put(&md, manifest.as_bytes()).unwrap();
    store
        .set_media_type(&md, "application/vnd.oci.image.manifest.v1+json")
        .unwrap();
    store
        .set_tag(
            &"quay.io/org/app:v1".parse().unwrap(),
            stowage::cache::TagVariant {
                accept: "application/vnd.oci.image.manifest.v1+json".into(),
                digest: md,
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                checked_at_ms: 1,
            },
        )
        .unwrap();
    store.flush_atimes().unwrap();
}

#[test]
fn cache_ls_after_a_prune_says_evicted_and_never() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    cache_with_one_image(&cache);
    let run = |args: &[&str]| {
        let o = stowage(dir.path())
            .args(["--listen", "127.0.0.1:1"])
            .arg("--cache-dir")
            .arg(&cache)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        stdout(&o)
    };
    let before = run(&["cache", "ls"]);
    assert!(before.contains("org/app:v1"), "{before}");
    assert!(
        before.contains("last used 0s ago") || before.contains("last used 1s ago"),
        "{before}"
    );
    let pruned = run(&["cache", "prune", "--max-size", "0B"]);
    assert!(pruned.contains("removed 3 objects"), "{pruned}");
    let after = run(&["cache", "ls"]);
    assert!(after.contains("org/app:v1"), "{after}");
    assert!(after.contains("layers evicted"), "{after}");
    assert!(after.contains("last used never"), "{after}");
    assert!(
        !after.contains("d ago") && !after.contains("not cached"),
        "{after}"
    );
}

// --- 7. Logs ----------------------------------------------------------------------------

/// The number of decimals of the `duration_ms` value in an access-log line.
fn duration_decimals(line: &str) -> usize {
    let i = line.find("duration_ms").expect("duration_ms") + "duration_ms".len();
    let value: String = line[i..]
        .trim_start_matches(['=', '"', ':'])
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    assert!(!value.is_empty(), "{line}");
    value.split_once('.').map_or(0, |(_, f)| f.len())
}

#[test]
fn logs_print_addresses_plainly_and_round_durations() {
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        // The mirror's default registry is pinned to loopback port 443, where nothing
        // answers: every request gets a quick upstream error, and an access-log line.
        let cfg = config(
            dir.path(),
            "",
            &format!(
                "[log]\nformat = \"{format}\"\n\n[mirror]\nlisten = \"127.0.0.1:0\"\n\n[upstream.resolve]\n\"registry-1.docker.io\" = \"127.0.0.1\"\n"
            ),
        );
        let server = Server::start(dir.path(), &cfg);
        let mirror_line = server.wait_for_log("mirror");
        let mirror = first_addr(&mirror_line).expect("mirror address");
        let listening = server.wait_for_log("listening");
        for line in [&listening, &mirror_line] {
            assert!(
                line.contains(&"listen=127.0.0.1:".to_string())
                    || line.contains("\"listen\":\"127.0.0.1:"),
                "{format}: {line}"
            );
        }
        let _ = http_get(mirror, "/v2/library/alpine/manifests/latest");
        let access = server.wait_for_log("duration_ms");
        assert!(
            duration_decimals(&access) <= 3,
            "{format}: unrounded duration: {access}"
        );
        if format == "json" {
            let v: serde_json::Value = serde_json::from_str(&access).expect("one JSON object");
            assert!(
                v["duration_ms"].is_f64() || v["duration_ms"].is_u64(),
                "{access}"
            );
        }
        let log = server.log();
        assert!(
            !log.contains("Some("),
            "{format}: Debug-printed Option:\n{log}"
        );
    }
}

// --- 9. cache verify through a server ---------------------------------------------------

#[test]
fn verify_through_the_server_shows_progress_and_the_removed_digests() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", "");
    let digests = fill_cache(&dir.path().join("cache"), 2100, 2);
    let server = Server::start(dir.path(), &cfg);
    let o = stowage(dir.path())
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", &server.addr.to_string(), "cache", "verify"])
        .output()
        .unwrap();
    let text = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "corruption found: {text}{}",
        stderr(&o)
    );
    // Not a terminal: one line per 1000 objects, as they are checked.
    assert!(text.contains("verified 1000 of 2100 objects"), "{text}");
    assert!(text.contains("verified 2000 of 2100 objects"), "{text}");
    for d in &digests[..2] {
        assert!(text.contains(&format!("corrupt: {d} (removed)")), "{text}");
    }
    assert!(
        text.contains("verified 2100 objects") && text.contains("2 corrupt and removed"),
        "{text}"
    );
    let last = text.lines().last().unwrap_or("");
    assert!(
        last.starts_with("verified 2100 objects"),
        "the summary comes last: {text}"
    );
    // The server removed them.
    for d in &digests[..2] {
        let hex = &d[7..];
        assert!(!dir
            .path()
            .join("cache/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists());
    }
    drop(server);
}

// --- 9b. `stowage setup` tells the truth ----------------------------------------------

/// A loopback port nothing listens on (bound, read back, released).
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
        .collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn setup_without_a_server_refuses_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A config.toml in the working directory, as in a checkout: still nothing is written.
    std::fs::write(
        dir.path().join("config.toml"),
        "[proxy]\nlisten = \"127.0.0.1:3128\"\n",
    )
    .unwrap();
    let before = listing(dir.path());
    let port = closed_port();
    for runtime in ["docker", "ca", "containerd", "bogus"] {
        let o = stowage(dir.path())
            .args(["--listen", &format!("127.0.0.1:{port}"), "setup", runtime])
            .output()
            .unwrap();
        let err = assert_user_error(&o, &format!("setup {runtime} with no server"));
        if runtime == "bogus" {
            assert!(err.contains("unknown runtime \"bogus\""), "{err}");
        } else {
            assert!(
                err.contains(&format!("no Stowage is running at 127.0.0.1:{port}"))
                    && err.contains("stowage run"),
                "{runtime}: {err}"
            );
        }
        assert!(o.stdout.is_empty(), "{runtime} printed {:?}", stdout(&o));
        assert_eq!(
            listing(dir.path()),
            before,
            "setup {runtime} wrote into the working directory"
        );
    }
}

#[test]
fn setup_prints_the_running_servers_ca_and_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", "[mirror]\nlisten = \"127.0.0.1:0\"\n");
    let server = Server::start(dir.path(), &cfg);
    let mirror_line = server.wait_for_log("listener=\"mirror\"");
    let mirror = first_addr(&mirror_line).expect("the mirror's address");
    // Asked from another working directory, with no configuration: only --listen.
    let cwd = tempfile::tempdir().unwrap();
    let setup = |args: &[&str]| {
        let o = stowage(cwd.path())
            .args(["--listen", &server.addr.to_string(), "setup"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "setup {args:?}: {}", stderr(&o));
        stdout(&o)
    };
    let ca = setup(&["ca"]);
    assert_eq!(
        ca.as_bytes(),
        std::fs::read(dir.path().join("certs/ca.crt")).unwrap(),
        "setup ca is not the server's CA"
    );
    assert!(
        listing(cwd.path()).is_empty(),
        "setup wrote {:?}",
        listing(cwd.path())
    );

    // The listener's address, and the snippet says it only works on this machine.
    let docker = setup(&["docker"]);
    assert!(
        docker.contains(&format!("HTTPS_PROXY=http://{}\"", server.addr))
            && docker.contains(&format!("curl -fsS http://{}/ca.crt", server.addr)),
        "{docker}"
    );
    assert!(docker.contains("this machine only"), "{docker}");
    // The mirror's bound port (the config says 0), from the server.
    let mirror_snippet = setup(&["docker-mirror"]);
    let json = mirror_snippet
        .split_once("# file: /etc/docker/daemon.json\n")
        .expect("daemon.json")
        .1;
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(
        v["registry-mirrors"],
        serde_json::json!([format!("http://{mirror}")]),
        "{mirror_snippet}"
    );
    // An address the user gives wins, and is said to be theirs.
    let given = setup(&["containerd", "--address", "10.9.8.7:3128"]);
    assert!(
        given.contains("[host.\"http://10.9.8.7:")
            && given.contains("--address")
            && !given.contains("127.0.0.1"),
        "{given}"
    );
    // The HTTP endpoint takes the address from Host, and says so.
    let (status, body) = http_get(server.addr, "/setup/podman");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("(its Host)")
            && body.contains(&format!("127.0.0.1:{}/docker.io", mirror.port())),
        "{body}"
    );
}

// --- 10. Docs that match ----------------------------------------------------------------

fn repo_file(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn help(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let o = stowage(dir.path()).args(args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    stdout(&o)
}

/// The entries of a `--help` section (`Commands:` or `Options:`): subcommand names, or
/// long flags; `help`, `--help` and `--version` left out.
fn help_section(text: &str, section: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut inside = false;
    for line in text.lines() {
        if line.ends_with(':') && !line.starts_with(' ') {
            inside = line == section;
            continue;
        }
        if !inside || !line.starts_with("  ") {
            continue;
        }
        // An option's own line starts with its flag; wrapped text does not.
        if section == "Options:" && !line.trim_start().starts_with('-') {
            continue;
        }
        let entry = line.split_whitespace().find(|w| {
            if section == "Options:" {
                w.starts_with("--")
            } else {
                true
            }
        });
        if let Some(e) = entry {
            let e = e.trim_end_matches(',');
            if !["help", "--help", "--version"].contains(&e)
                && (section != "Commands:" || line.starts_with("  ") && !line.starts_with("   "))
            {
                out.insert(e.to_owned());
            }
        }
    }
    out
}

/// Every long flag in `text`.
fn flags(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_readme_command_list_matches_help() {
    let readme = repo_file("README.md");
    let block: Vec<&str> = readme
        .split("```")
        .find(|b| b.starts_with("sh\nstowage "))
        .expect("the README's command block")
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("stowage"))
        .collect();
    let top = help(&["--help"]);
    let global = help_section(&top, "Options:");
    // Top level: the subcommands and the global flags.
    let mut readme_commands = std::collections::BTreeSet::new();
    let mut readme_global = std::collections::BTreeSet::new();
    for line in &block {
        let (usage, comment) = line.split_once('#').unwrap_or((line, ""));
        let second = usage.split_whitespace().nth(1).unwrap_or("");
        if second.starts_with('-') || second.starts_with('[') {
            readme_global.extend(flags(usage));
            if comment.contains("run (default command)") {
                readme_commands.insert("run".to_owned());
            }
        } else {
            readme_commands.insert(second.to_owned());
        }
    }
    assert_eq!(readme_commands, help_section(&top, "Commands:"), "{top}");
    assert_eq!(readme_global, global, "{top}");

    // Each subcommand (and each of `cache`'s and `ca`'s): the same flags as its --help.
    for line in &block {
        let usage = line.split_once('#').map_or(*line, |(u, _)| u);
        let words: Vec<&str> = usage.split_whitespace().collect();
        match words.get(1).copied() {
            Some(group @ ("cache" | "ca")) => {
                let rest = usage.split_once(group).unwrap().1;
                let mut listed = std::collections::BTreeSet::new();
                for part in rest.split('|') {
                    let name = part.split_whitespace().next().unwrap().to_owned();
                    let sub = help(&[group, &name, "--help"]);
                    let own: std::collections::BTreeSet<String> = help_section(&sub, "Options:")
                        .difference(&global)
                        .cloned()
                        .collect();
                    assert_eq!(flags(part), own, "stowage {group} {name}: {sub}");
                    listed.insert(name);
                }
                let group_help = help(&[group, "--help"]);
                assert_eq!(
                    listed,
                    help_section(&group_help, "Commands:"),
                    "{group_help}"
                );
            }
            Some("setup") => {
                let sub = help(&["setup", "--help"]);
                let own: std::collections::BTreeSet<String> = help_section(&sub, "Options:")
                    .difference(&global)
                    .cloned()
                    .collect();
                assert_eq!(flags(usage), own, "stowage setup: {sub}");
            }
            _ => {}
        }
    }
}

#[test]
fn help_names_every_setup_runtime_and_every_flag_says_what_it_does() {
    let readme = repo_file("README.md");
    let listed = readme
        .split_once("`stowage setup <runtime>`, with runtime one")
        .expect("the README's runtime list")
        .1;
    let listed = &listed[..listed.find('.').unwrap()];
    let runtimes: Vec<&str> = listed.split('`').skip(1).step_by(2).collect();
    assert!(
        runtimes.contains(&"ca") && runtimes.len() > 10,
        "{runtimes:?}"
    );
    let setup = help(&["help", "setup"]);
    let one_of = setup
        .lines()
        .find_map(|l| l.split_once("One of: "))
        .expect("help setup lists the runtimes")
        .1;
    let in_help: Vec<&str> = one_of.trim_end_matches('.').split(", ").collect();
    assert_eq!(in_help, runtimes, "stowage help setup: {setup}");
    // Every runtime it names has a snippet, from the running server.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &config(dir.path(), "", ""));
    for r in &runtimes {
        let o = stowage(dir.path())
            .args(["--listen", &server.addr.to_string(), "setup", r])
            .output()
            .unwrap();
        assert!(o.status.success(), "setup {r}: {}", stderr(&o));
    }
    drop(server);

    for args in [
        &["cache", "prune", "--help"][..],
        &["cache", "stats", "--help"],
        &["cache", "ls", "--help"],
        &["setup", "--help"],
        &["ca", "export", "--help"],
        &["--help"],
    ] {
        let text = help(args);
        for line in text.lines().filter(|l| l.trim_start().starts_with('-')) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let described = words
                .iter()
                .skip_while(|w| w.starts_with('-') || w.starts_with('<'))
                .count();
            assert!(described > 0, "{args:?}: no help text for {line:?}");
        }
    }
}

#[test]
fn docs_point_at_what_exists() {
    let readme = repo_file("README.md");
    let headings: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches('#').trim())
        .collect();
    for file in ["config.toml", "docker/config.toml"] {
        let text = repo_file(file);
        for (_, rest) in text
            .match_indices("README, \"")
            .map(|(i, _)| text.split_at(i + 9))
        {
            let name = &rest[..rest.find('"').unwrap()];
            assert!(
                headings.contains(&name),
                "{file} names README section {name:?}"
            );
        }
    }
    assert!(
        readme.contains("cargo install --path ."),
        "how to put stowage on PATH"
    );
    // The runtime image's base carries glibc (distroless cc): the binary is not static.
    assert!(repo_file("Dockerfile").contains("distroless/cc-debian12"));
    assert!(readme.contains("links glibc") || readme.contains("(glibc,"));
    assert!(!readme.contains("static binary") && !readme.contains("static\n  binary"));
    for doc in ["README.md", "bench/README.md", "docs/architecture.md"] {
        let text = repo_file(doc);
        assert!(
            !text.contains("issue 8"),
            "{doc} refers to an issue number readers cannot look up"
        );
    }
}
