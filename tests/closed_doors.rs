//! Doors a red-team pass found open (issue 14, items 4-7), each shut and kept shut: `/admin`
//! only for clients that really are local, never through the proxy's forwarding path;
//! silent connections closed at the first-byte deadline; the mirror's CA leaves only for
//! the mirror's own names and configured registries.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` (a whole HTTP/1.1 request with `Connection: close`) to `addr` and
/// returns the status and the whole answer as text.
async fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut tcp = bounded("connect", TcpStream::connect(addr)).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    let _ = bounded("answer", tcp.read_to_end(&mut resp)).await;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn origin_get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: stowage\r\nConnection: close\r\n\r\n")
}

/// Whether `[::]` binds here and accepts IPv4 clients (a dual-stack socket).
fn dual_stack_available() -> bool {
    let Ok(l) = std::net::TcpListener::bind("[::]:0") else {
        return false;
    };
    let port = l.local_addr().unwrap().port();
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A cache with one blob in it, and the digest.
async fn cache_one_blob(stowage: &Stowage, quay: &FakeRegistry) -> String {
    let digest = quay.push_blob("team/app", pseudo_random(5000, 140));
    let client = ProxyClient::via_proxy(
        SocketAddr::from(([127, 0, 0, 1], stowage.addr.port())),
        &stowage.ca_pem,
    );
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    assert_eq!(s.blob(&digest).await.status, StatusCode::OK);
    eventually("blob cached", || stowage.is_cached(&digest)).await;
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_answers_local_ipv4_clients_on_a_dual_stack_listener() {
    if !dual_stack_available() {
        eprintln!("skipped: [::] does not bind or does not accept IPv4 clients here");
        return;
    }
    let ca = TestCa::new();
    let stowage = Stowage::builder().trust(&ca).listen("[::]:0").start().await;
    let port = stowage.addr.port();
    // An IPv4 client arrives as ::ffff:127.0.0.1; an IPv6 one as ::1. Both are local.
    for ip in ["127.0.0.1", "::1"] {
        let addr = SocketAddr::new(ip.parse().unwrap(), port);
        let (status, text) = raw(addr, &origin_get("/admin/stats")).await;
        assert_eq!(status, 200, "/admin/stats from {ip}: {text}");
        assert!(text.contains("max_size"), "/admin/stats from {ip}: {text}");
    }
}

/// Every way of asking the proxy to forward to itself: names pinned to the IPv4-mapped,
/// plain and unspecified forms of a local address, and those addresses as literals.
fn self_authorities(port: u16) -> Vec<String> {
    [
        "mapped.test",
        "plain.test",
        "zero.test",
        "zero6.test",
        "127.0.0.1",
        "[::ffff:127.0.0.1]",
        "0.0.0.0",
        "[::]",
    ]
    .iter()
    .map(|h| format!("{h}:{port}"))
    .collect()
}

/// `POST /admin/prune?max_size=0` in absolute form and through `CONNECT` to every
/// self-authority: refused each time, and the cache keeps its blob.
async fn prune_through_the_proxy_deletes_nothing(listen: &str) {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stowage = Stowage::builder()
        .trust(&ca)
        .listen(&format!("{listen}:{port}"))
        .tunnel_ports(&[443, port])
        .pin("mapped.test", "::ffff:127.0.0.1")
        .pin("plain.test", "127.0.0.1")
        .pin("zero.test", "0.0.0.0")
        .pin("zero6.test", "::")
        .start()
        .await;
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let digest = cache_one_blob(&stowage, &quay).await;
    for authority in self_authorities(port) {
        let prune = format!(
            "POST http://{authority}/admin/prune?max_size=0 HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let (status, text) = raw(local, &prune).await;
        assert!(
            status == 508 || status == 403,
            "absolute-form POST http://{authority}/admin/prune answered {status}: {text}"
        );
        assert!(
            stowage.is_cached(&digest),
            "POST http://{authority}/admin/prune through the proxy deleted the cache"
        );

        let mut tcp = TcpStream::connect(local).await.unwrap();
        let connect = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        tcp.write_all(connect.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        bounded("CONNECT answer", async {
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if tcp.read(&mut b).await.unwrap_or(0) == 0 {
                    break;
                }
                head.push(b[0]);
            }
        })
        .await;
        let head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status == 200 {
            // A tunnel opened: whatever answers inside must not be /admin.
            let inner = "POST /admin/prune?max_size=0 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            let _ = tcp.write_all(inner.as_bytes()).await;
            let mut rest = Vec::new();
            let _ = bounded("tunnel answer", tcp.read_to_end(&mut rest)).await;
            panic!(
                "CONNECT {authority} opened a tunnel to this proxy; inside it answered {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
        assert!(
            status == 508 || status == 403,
            "CONNECT {authority} answered {head:?}"
        );
        assert!(
            stowage.is_cached(&digest),
            "CONNECT {authority} + /admin/prune deleted the cache"
        );
    }
    // A real local client still may.
    let (status, text) = raw(local, &origin_get("/admin/stats")).await;
    assert_eq!(status, 200, "{text}");
    assert!(stowage.is_cached(&digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_is_never_reached_through_the_forwarding_path() {
    prune_through_the_proxy_deletes_nothing("127.0.0.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_is_never_reached_through_the_forwarding_path_on_a_dual_stack_listener() {
    if !dual_stack_available() {
        eprintln!("skipped: [::] does not bind or does not accept IPv4 clients here");
        return;
    }
    prune_through_the_proxy_deletes_nothing("[::]").await;
}

/// Waits for the server to close `tcp` (EOF or reset); `None` when it is still open
/// after `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut b = [0u8; 1];
    match tokio::time::timeout(within, tcp.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(started.elapsed()),
        Ok(Ok(_)) => panic!("a silent client was sent bytes"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_at_the_header_timeout() {
    let ca = TestCa::new();
    let stowage = Stowage::builder()
        .trust(&ca)
        .proxy("header_timeout = \"1s\"")
        .proxy("idle_timeout = \"10s\"")
        .proxy("max_connections = 20")
        .toml("[mirror]\nlisten = \"127.0.0.1:0\"\n")
        .start()
        .await;
    let mirror = stowage.mirror_addr.expect("mirror listener");
    // A zero-byte connection on the mirror listener (plain HTTP) is closed too.
    let mut quiet = TcpStream::connect(mirror).await.unwrap();
    let held = closed_within(&mut quiet, Duration::from_secs(6)).await;
    assert!(
        held.is_some(),
        "a zero-byte connection to the mirror was still open after 6s (header_timeout 1s)"
    );

    // Twenty of them fill max_connections = 20 ...
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(stowage.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... but only until the header timeout: then a real client gets in.
    let healthz = origin_get("/healthz");
    let got_in = bounded("a real client", async {
        loop {
            let (status, _) = raw(stowage.addr, &healthz).await;
            if status == 200 {
                return opened.elapsed();
            }
            assert_eq!(status, 503, "while the limit is full");
            if opened.elapsed() > Duration::from_secs(6) {
                panic!("20 silent connections locked clients out for over 6s (header_timeout 1s)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(got_in < Duration::from_secs(4), "locked out for {got_in:?}");
    for (i, tcp) in silent.iter_mut().enumerate() {
        let held = closed_within(tcp, Duration::from_secs(3)).await;
        assert!(
            held.is_some(),
            "silent connection {i} still open {:?} after it was opened (header_timeout 1s)",
            opened.elapsed()
        );
    }
    // A client that sends its request a little late, inside the deadline, is served.
    let mut late = TcpStream::connect(stowage.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    late.write_all(healthz.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    bounded("late client", late.read_to_end(&mut resp))
        .await
        .unwrap();
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
}
