//! Faults and hostile clients (issue 6): a real Stowage on 127.0.0.1:0 in front of a fake
//! registry that misbehaves on purpose (`common::Fault`). Whatever upstream or a client
//! does, Stowage must not crash, hang, keep a corrupt cache entry, or hand a client a
//! complete response with wrong bytes. Every request is bounded by a timeout so a hang
//! fails the test instead of stalling it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn metrics(stowage: &Stowage) -> String {
    let r = stowage.client().proxy_get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    r.text()
}

/// What a client may get for a blob upstream broke: an error status, a transport error,
/// or a body that is visibly incomplete. Never the whole announced length.
fn assert_not_delivered_complete(r: &Result<Resp, String>, len: usize, what: &str) {
    match r {
        Ok(r) if r.status.is_success() => assert!(
            r.body_error.is_some() || r.body.len() < len,
            "{what}: a broken blob arrived complete ({} bytes, X-Cache {})",
            r.body.len(),
            r.x_cache()
        ),
        Ok(r) => assert!(
            r.status.is_server_error(),
            "{what}: unexpected status {}: {}",
            r.status,
            r.text()
        ),
        Err(_) => {}
    }
}

/// Delivered bytes, complete or not, must be a prefix of the real content.
fn assert_prefix(r: &Result<Resp, String>, data: &[u8], what: &str) {
    if let Ok(r) = r {
        if r.status.is_success() {
            assert!(
                r.body.len() <= data.len() && r.body[..] == data[..r.body.len()],
                "{what}: delivered bytes that are not the blob's"
            );
        }
    }
}

/// After a failed fill: nothing cached, no temp file left, no fill still running.
async fn assert_clean(stowage: &Stowage, digest: &str) {
    eventually("temp files removed", || stowage.temp_files().is_empty()).await;
    assert!(!stowage.is_cached(digest), "a broken blob was cached");
    let m = metrics(stowage).await;
    assert_eq!(metric(&m, "stowage_fills_in_flight", &[]), 0.0, "{m}");
}

/// The same blob once upstream is healthy again: served, then cached, then a hit.
async fn assert_recovers(stowage: &Stowage, s: &Session, digest: &str) {
    let r = bounded("healthy GET", s.blob(digest)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sha256_digest(&r.body), digest);
    eventually("the healthy blob stored", || stowage.is_cached(digest)).await;
    assert_eq!(bounded("hit", s.blob(digest)).await.x_cache(), "hit");
}

/// One broken upstream behaviour, both client protocols: bounded, not complete, only true
/// bytes, nothing cached; then upstream heals and the blob is served and cached.
async fn broken_body_case(fault: Fault, upstream_lines: &[&str]) {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(600_000, 21);
    let digest = quay.push_blob("team/app", data.clone());
    quay.set_fault(&digest, fault.clone());
    let mut b = Stowage::builder().trust(&ca);
    for l in upstream_lines {
        b = b.upstream(l);
    }
    let stowage = b.start().await;
    let client = stowage.client();
    for (i, alpn) in [Alpn::Http11, Alpn::H2].into_iter().enumerate() {
        let what = format!("{fault:?} over {alpn:?}");
        let s = Session::login(&client, "quay.io", quay.port(), "team/app", alpn).await;
        let started = Instant::now();
        let r = bounded(
            &what,
            s.request_raw(Method::GET, &s.blob_path(&digest), &[]),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: took {:?}",
            started.elapsed()
        );
        assert_not_delivered_complete(&r, data.len(), &what);
        assert_prefix(&r, &data, &what);
        assert_eq!(quay.blob_gets(), i + 1, "{what}: {:#?}", quay.requests());
        assert_clean(&stowage, &digest).await;
    }
    let m = metrics(&stowage).await;
    assert_eq!(
        metric(&m, "stowage_digest_mismatches_total", &[]),
        0.0,
        "{fault:?} is not a digest mismatch: {m}"
    );
    quay.clear_fault(&digest);
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    assert_recovers(&stowage, &s, &digest).await;
    // The proxy is still healthy.
    assert_eq!(client.proxy_get("/healthz").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_truncates_the_body() {
    broken_body_case(Fault::Truncate(250_000), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_resets_mid_body() {
    broken_body_case(Fault::ResetAfter(250_000), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stalls_mid_body() {
    broken_body_case(Fault::StallAfter(250_000), &["idle_timeout = \"1s\""]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_never_answers() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(100_000, 22);
    let digest = quay.push_blob("team/app", data.clone());
    quay.set_fault(&digest, Fault::StallHead);
    let stowage = Stowage::builder()
        .trust(&ca)
        .upstream("response_timeout = \"1s\"")
        .start()
        .await;
    let client = stowage.client();
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::H2).await;
    let started = Instant::now();
    let r = bounded(
        "stalled head",
        s.request_raw(Method::GET, &s.blob_path(&digest), &[]),
    )
    .await
    .expect("an answer");
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert!(r.json()["errors"][0]["code"].is_string());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_clean(&stowage, &digest).await;
    let m = metrics(&stowage).await;
    assert!(
        metric(
            &m,
            "stowage_upstream_errors_total",
            &[
                ("registry", &format!("quay.io:{}", quay.port())),
                ("status", "timeout")
            ]
        ) >= 1.0,
        "{m}"
    );
    quay.clear_fault(&digest);
    assert_recovers(&stowage, &s, &digest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_are_not_delivered_complete_even_when_not_caching() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(256 * 1024, 23);
    let digest = quay.push_blob("team/app", data.clone());
    quay.corrupt_blob(&digest);
    quay.set_tail_delay(Duration::from_millis(300));
    // The disk is "full": every blob is passed through instead of filled.
    let stowage = Stowage::builder()
        .trust(&ca)
        .cache("min_free = \"1000TiB\"")
        .start()
        .await;
    let client = stowage.client();
    for alpn in [Alpn::Http11, Alpn::H2] {
        let what = format!("pass-through over {alpn:?}");
        let s = Session::login(&client, "quay.io", quay.port(), "team/app", alpn).await;
        let r = bounded(
            &what,
            s.request_raw(Method::GET, &s.blob_path(&digest), &[]),
        )
        .await;
        assert_not_delivered_complete(&r, data.len(), &what);
        if let Ok(r) = &r {
            assert_ne!(r.x_cache(), "hit");
        }
    }
    assert!(stowage.cached_files().is_empty());
    let m = metrics(&stowage).await;
    assert!(
        metric(
            &m,
            "stowage_cache_write_errors_total",
            &[("reason", "disk_full")]
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric(&m, "stowage_digest_mismatches_total", &[]) >= 2.0,
        "{m}"
    );
    // Healthy content still passes through complete.
    quay.heal(&digest);
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let r = bounded("healthy pass-through", s.blob(&digest)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256_digest(&r.body), digest);
    assert!(stowage.cached_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_5xx_and_429_pass_through_and_nothing_is_cached() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(50_000, 24);
    let digest = quay.push_blob("team/app", data.clone());
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let mut gets = 0;
    for code in [503u16, 500, 429] {
        quay.set_fault(&digest, Fault::Status(code));
        for _ in 0..2 {
            let r = bounded("error status", s.blob(&digest)).await;
            gets += 1;
            assert_eq!(r.status.as_u16(), code, "{}", r.text());
            assert_eq!(
                r.header("retry-after"),
                Some("1"),
                "{code}: Retry-After passed through"
            );
            assert!(r.json()["errors"][0]["code"].is_string());
            assert_eq!(r.x_cache(), "miss");
            // No negative caching: each request asks upstream.
            assert_eq!(quay.blob_gets(), gets);
        }
        let m = metrics(&stowage).await;
        assert_eq!(
            metric(
                &m,
                "stowage_upstream_errors_total",
                &[
                    ("registry", &format!("quay.io:{}", quay.port())),
                    ("status", &code.to_string())
                ]
            ),
            2.0,
            "{m}"
        );
        assert_clean(&stowage, &digest).await;
    }
    quay.clear_fault(&digest);
    assert_recovers(&stowage, &s, &digest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_loops_are_bounded() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let digest = quay.push_blob("team/app", pseudo_random(10_000, 25));
    quay.set_fault(&digest, Fault::RedirectLoop);
    let stowage = Stowage::builder()
        .trust(&ca)
        .upstream("max_redirects = 3")
        .start()
        .await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::H2,
    )
    .await;
    let r = bounded("redirect loop", s.blob(&digest)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert!(r.text().contains("redirect"), "{}", r.text());
    // The first request and three hops, then Stowage gives up.
    assert_eq!(
        quay.count_status(Kind::Blob, 307),
        4,
        "{:#?}",
        quay.requests()
    );
    assert_clean(&stowage, &digest).await;
    quay.clear_fault(&digest);
    assert_recovers(&stowage, &s, &digest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_hosts_that_do_not_answer_fail_fast() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let a = quay.push_blob("team/app", pseudo_random(10_000, 26));
    let b = quay.push_blob("team/app", pseudo_random(10_000, 27));
    // A closed port, and a listener that accepts and then says nothing at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    quay.set_fault(
        &a,
        Fault::RedirectTo(format!("https://storage.test:{closed}/blobs/{a}?sig=1")),
    );
    quay.set_fault(
        &b,
        Fault::RedirectTo(format!(
            "https://storage.test:{silent_port}/blobs/{b}?sig=1"
        )),
    );
    let stowage = Stowage::builder()
        .trust(&ca)
        .upstream("response_timeout = \"2s\"")
        .start()
        .await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::Http11,
    )
    .await;
    for (d, expect) in [
        (&a, StatusCode::BAD_GATEWAY),
        (&b, StatusCode::GATEWAY_TIMEOUT),
    ] {
        let started = Instant::now();
        let r = bounded("dead redirect target", s.blob(d)).await;
        assert_eq!(r.status, expect, "{}", r.text());
        assert!(r.json()["errors"][0]["message"].is_string());
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "took {:?}",
            started.elapsed()
        );
        assert_clean(&stowage, d).await;
    }
    quay.clear_fault(&a);
    assert_recovers(&stowage, &s, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_download_does_not_stop_the_fill() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(2 << 20, 28);
    let digest = quay.push_blob("team/app", data.clone());
    let lone = quay.push_blob("team/app", pseudo_random(1 << 20, 29));
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let auth = format!("Bearer {}", s.token);
    let headers = [("authorization", auth.as_str())];
    let gate = quay.hold_blob_bodies();

    // Two clients on one download; the first (the leader) leaves after the head.
    let leaving = client
        .tunnel("quay.io", quay.port(), Alpn::H2)
        .await
        .unwrap();
    let staying = client
        .tunnel("quay.io", quay.port(), Alpn::Http11)
        .await
        .unwrap();
    let head = bounded(
        "leader head",
        leaving.send(Method::GET, &s.blob_path(&digest), &headers),
    )
    .await
    .unwrap();
    assert_eq!(head.headers().get("x-cache").unwrap(), "miss");
    let other = bounded(
        "follower head",
        staying.send(Method::GET, &s.blob_path(&digest), &headers),
    )
    .await
    .unwrap();
    assert_eq!(other.headers().get("x-cache").unwrap(), "coalesced");
    drop(head);
    drop(leaving);
    // A lone client leaves too: its fill must still complete, for the cache.
    let alone = client
        .tunnel("quay.io", quay.port(), Alpn::Http11)
        .await
        .unwrap();
    let head = bounded(
        "lone head",
        alone.send(Method::GET, &s.blob_path(&lone), &headers),
    )
    .await
    .unwrap();
    drop(head);
    drop(alone);
    gate.open();

    let r = client::read_response(other).await;
    r.assert_complete();
    assert_eq!(
        sha256_digest(&r.body),
        digest,
        "the remaining client got the whole blob"
    );
    eventually("the shared blob stored", || stowage.is_cached(&digest)).await;
    eventually("the abandoned blob stored", || stowage.is_cached(&lone)).await;
    assert_eq!(
        quay.blob_gets(),
        2,
        "one download each: {:#?}",
        quay.requests()
    );
    assert_eq!(
        sha256_digest(&std::fs::read(stowage.blob_path(&lone)).unwrap()),
        lone
    );
    let m = metrics(&stowage).await;
    assert_eq!(
        metric(&m, "stowage_digest_mismatches_total", &[]),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "stowage_cache_write_errors_total", &[]),
        0.0,
        "{m}"
    );
    assert_eq!(metric(&m, "stowage_fills_in_flight", &[]), 0.0, "{m}");
    assert_eq!(bounded("hit", s.blob(&lone)).await.x_cache(), "hit");
    assert_eq!(quay.blob_gets(), 2);
}

// --- Access control and hostile clients ---------------------------------------------------

/// `CONNECT authority` with extra header lines; returns the stream, status and head.
async fn connect_with(
    proxy: std::net::SocketAddr,
    authority: &str,
    extra: &str,
) -> (TcpStream, StatusCode, String) {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    bounded("CONNECT answer", async {
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if tcp.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (tcp, StatusCode::from_u16(status).unwrap(), text)
}

/// TLS to `host` on an open tunnel, trusting `ca_pem`; then `GET path` over HTTP/1.1.
async fn get_in_tunnel(tcp: TcpStream, host: &str, ca_pem: &str, path: &str) -> StatusCode {
    let config = client_config(ca_pem);
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS in the tunnel");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", host)
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = bounded("GET in tunnel", send.send_request(req))
        .await
        .unwrap();
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_the_allow_list_get_403() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(1000, 30)]);
    let closed = Stowage::builder()
        .trust(&ca)
        .proxy("allow = [\"10.0.0.0/8\", \"fd00::/8\"]")
        .start()
        .await;
    let (_, status, _) = connect_with(closed.addr, &format!("quay.io:{}", quay.port()), "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, status, _) = connect_with(closed.addr, "tunnel.test:443", "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Refused at accept, before Stowage serves anything: the answer is a plain 403 and a close.
    let mut tcp = TcpStream::connect(closed.addr).await.unwrap();
    let _ = tcp
        .write_all(b"GET /ca.crt HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut resp = Vec::new();
    let _ = bounded("refused client", tcp.read_to_end(&mut resp)).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(!text.contains("BEGIN CERTIFICATE"), "{text}");
    assert_eq!(
        quay.server().connections(),
        0,
        "a refused client made Stowage reach upstream"
    );

    let open = Stowage::builder()
        .trust(&ca)
        .proxy("allow = [\"10.0.0.0/8\", \"127.0.0.0/8\"]")
        .start()
        .await;
    let p = pull(
        &open.client(),
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::H2,
    )
    .await;
    assert_eq!(p.manifest_digest, img.manifest);
}

/// One raw request to `addr`; the whole answer as text.
async fn raw_answer(addr: std::net::SocketAddr, request: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(request.as_bytes()).await;
    let mut resp = Vec::new();
    let _ = bounded("answer", tcp.read_to_end(&mut resp)).await;
    String::from_utf8_lossy(&resp).into_owned()
}

/// A liveness probe comes from wherever the kubelet runs: `/healthz` answers whatever
/// `allow` says (issue 20), on the proxy and the mirror listener; nothing else does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_outside_the_allow_list_and_nothing_else_does() {
    let stowage = Stowage::builder()
        .proxy("allow = [\"10.0.0.0/8\"]")
        .toml("[mirror]\nlisten = \"127.0.0.1:0\"\nallow = [\"10.0.0.0/8\"]\n")
        .start()
        .await;
    let mirror = stowage.mirror_addr.expect("mirror listener");
    for addr in [stowage.addr, mirror] {
        for probe in ["GET /healthz HTTP/1.1", "HEAD /healthz HTTP/1.1"] {
            let text = raw_answer(
                addr,
                &format!("{probe}\r\nHost: 10.1.2.3:3128\r\nUser-Agent: kube-probe/1.31\r\n\r\n"),
            )
            .await;
            assert!(text.starts_with("HTTP/1.1 200"), "{addr} {probe}: {text}");
        }
        for other in [
            "GET /metrics HTTP/1.1",
            "GET /ca.crt HTTP/1.1",
            "GET /admin/stats HTTP/1.1",
            "POST /healthz HTTP/1.1",
            "GET /v2/ HTTP/1.1",
            "CONNECT quay.io:443 HTTP/1.1",
        ] {
            let text = raw_answer(addr, &format!("{other}\r\nHost: x\r\n\r\n")).await;
            assert!(text.starts_with("HTTP/1.1 403"), "{addr} {other}: {text}");
            assert!(
                !text.contains("stowage_") && !text.contains("BEGIN CERTIFICATE"),
                "{text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_users_must_authenticate() {
    use base64::Engine;
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!(
            "# proxy users\nalice:{}\n",
            bcrypt::hash("s3cret", 4).unwrap()
        ),
    )
    .unwrap();
    let stowage = Stowage::builder()
        .trust(&ca)
        .proxy(&format!("users_file = {:?}", users.to_str().unwrap()))
        .start()
        .await;
    let target = format!("quay.io:{}", quay.port());
    let basic = |u: &str, p: &str| {
        format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    };

    let (_, status, head) = connect_with(stowage.addr, &target, "").await;
    assert_eq!(status, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    assert!(
        head.to_ascii_lowercase()
            .contains("proxy-authenticate: basic"),
        "{head}"
    );
    for wrong in [
        basic("alice", "wrong"),
        basic("mallory", "s3cret"),
        "Proxy-Authorization: Bearer s3cret\r\n".to_owned(),
        "Proxy-Authorization: Basic !!!\r\n".to_owned(),
    ] {
        let (_, status, _) = connect_with(stowage.addr, &target, &wrong).await;
        assert_eq!(status, StatusCode::PROXY_AUTHENTICATION_REQUIRED, "{wrong}");
    }
    assert_eq!(
        quay.server().connections(),
        0,
        "an unauthenticated client made Stowage reach upstream"
    );

    let (tcp, status, _) = connect_with(stowage.addr, &target, &basic("alice", "s3cret")).await;
    assert_eq!(status, StatusCode::OK);
    // The tunnel works: the fake registry's own challenge comes back.
    assert_eq!(
        get_in_tunnel(tcp, "quay.io", &stowage.ca_pem, "/v2/").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(quay.base_gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_will_not_tunnel_or_forward_to_itself() {
    let ca = TestCa::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Even with its own port allowed for tunnels, by address or by a name that resolves to it.
    let stowage = Stowage::builder()
        .trust(&ca)
        .listen(&format!("127.0.0.1:{port}"))
        .tunnel_ports(&[443, port])
        .start()
        .await;
    assert_eq!(stowage.addr.port(), port);
    for authority in [format!("127.0.0.1:{port}"), format!("tunnel.test:{port}")] {
        let (_, status, _) = connect_with(stowage.addr, &authority, "").await;
        assert!(
            status == StatusCode::LOOP_DETECTED || status == StatusCode::FORBIDDEN,
            "CONNECT {authority}: {status}"
        );
    }
    // Absolute-form requests to its own address are not forwarded back to itself either
    // (that would make a remote client a loopback one for /admin).
    for url in [
        format!("http://127.0.0.1:{port}/admin/stats"),
        format!("http://tunnel.test:{port}/admin/stats"),
    ] {
        let mut tcp = TcpStream::connect(stowage.addr).await.unwrap();
        tcp.write_all(
            format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut resp = Vec::new();
        bounded("absolute-form to self", tcp.read_to_end(&mut resp))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&resp);
        assert!(
            !text.contains("max_size"),
            "GET {url} reached /admin/stats: {text}"
        );
        assert!(!text.starts_with("HTTP/1.1 200"), "GET {url}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_key_is_never_served() {
    let ca = TestCa::new();
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    assert!(
        std::fs::read_dir(&stowage.ca_dir).unwrap().count() >= 2,
        "the CA key exists on disk"
    );
    for path in [
        "/ca.key",
        "/ca.crt/../ca.key",
        "/setup/../ca.key",
        "/setup/..%2fca.key",
        "/%2e%2e/ca.key",
        "/admin/../ca.key",
        "/ca.pem",
        "/ca.key.pem",
    ] {
        let r = client.proxy_get(path).await;
        assert_ne!(r.status, StatusCode::OK, "{path}");
        assert!(!r.text().contains("PRIVATE KEY"), "{path} served the key");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_slow_headers_are_refused() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let digest = quay.push_blob("team/app", pseudo_random(1000, 31));
    let stowage = Stowage::builder()
        .trust(&ca)
        .proxy("header_timeout = \"1s\"")
        .start()
        .await;

    // On the proxy listener: a 1 MiB header is refused, not buffered.
    let mut tcp = TcpStream::connect(stowage.addr).await.unwrap();
    let big = "a".repeat(1 << 20);
    let _ = tokio::time::timeout(
        BOUND,
        tcp.write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        ),
    )
    .await;
    let mut resp = Vec::new();
    let _ = bounded("huge header", tcp.read_to_end(&mut resp)).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(
        !text.starts_with("HTTP/1.1 200"),
        "a 1 MiB header was accepted: {text}"
    );

    // A client that never finishes its request head is cut off (slowloris).
    let mut tcp = TcpStream::connect(stowage.addr).await.unwrap();
    tcp.write_all(b"CONNECT quay.io:443 HTTP/1.1\r\nHost: quay.io")
        .await
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = bounded("slow head", tcp.read_to_end(&mut rest)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a stalled request head held the connection for {:?}",
        started.elapsed()
    );

    // Inside a registry tunnel, over HTTP/1.1 and h2.
    let client = stowage.client();
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    for alpn in [Alpn::Http11, Alpn::H2] {
        let t = client.tunnel("quay.io", quay.port(), alpn).await.unwrap();
        let auth = format!("Bearer {}", s.token);
        let r = bounded(
            "huge header in tunnel",
            t.request_raw(
                Method::GET,
                &s.blob_path(&digest),
                &[("authorization", &auth), ("x-big", &big)],
            ),
        )
        .await;
        if let Ok(r) = r {
            assert!(r.status.is_client_error(), "{alpn:?}: {}", r.status);
        }
    }
    assert_eq!(
        quay.blob_gets(),
        0,
        "a request with a huge header went upstream"
    );
    assert_eq!(client.proxy_get("/healthz").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_ranges_are_answered_cleanly() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(10_000, 32);
    let len = data.len();
    let digest = quay.push_blob("team/app", data.clone());
    let stowage = Stowage::start(&ca).await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::H2,
    )
    .await;
    assert_eq!(s.blob(&digest).await.x_cache(), "miss");
    eventually("stored", || stowage.is_cached(&digest)).await;
    let path = s.blob_path(&digest);
    let max = u64::MAX.to_string();
    let cases: Vec<(String, StatusCode, std::ops::Range<usize>)> = vec![
        (
            format!("bytes={max}-"),
            StatusCode::RANGE_NOT_SATISFIABLE,
            0..0,
        ),
        (
            format!("bytes=0-{max}"),
            StatusCode::PARTIAL_CONTENT,
            0..len,
        ),
        (format!("bytes=-{max}"), StatusCode::PARTIAL_CONTENT, 0..len),
        (
            "bytes=99999999999999999999999999-".into(),
            StatusCode::OK,
            0..len,
        ),
        ("bytes=-0".into(), StatusCode::RANGE_NOT_SATISFIABLE, 0..0),
        ("bytes=5-1".into(), StatusCode::OK, 0..len),
        ("bytes=0-0,5-9".into(), StatusCode::OK, 0..len),
        ("bytes=--5".into(), StatusCode::OK, 0..len),
        ("pages=1-2".into(), StatusCode::OK, 0..len),
        (
            format!("bytes={}-{}", len - 1, len - 1),
            StatusCode::PARTIAL_CONTENT,
            len - 1..len,
        ),
    ];
    for (range, status, want) in cases {
        let r = bounded("range", s.get(&path, &[("range", &range)])).await;
        assert_eq!(r.status, status, "Range: {range}");
        assert_eq!(r.x_cache(), "hit", "Range: {range}");
        if status.is_success() {
            assert_eq!(&r.body[..], &data[want.clone()], "Range: {range}");
            assert_eq!(
                r.content_length(),
                Some(want.len() as u64),
                "Range: {range}"
            );
        } else {
            assert_eq!(
                r.header("content-range"),
                Some(format!("bytes */{len}").as_str()),
                "Range: {range}"
            );
        }
    }
    assert_eq!(quay.blob_gets(), 1);
}

// --- A disk that fills ----------------------------------------------------------------------

/// The cache directory on a small tmpfs, or `None` (the reason printed) where this cannot
/// mount one.
fn cache_on_tmpfs(dir: &std::path::Path, size: &str, test: &str) -> Option<Tmpfs> {
    match Tmpfs::mount(&dir.join("cache"), size) {
        Ok(fs) => Some(fs),
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

/// After a fill the disk could not hold: nothing of it in the cache, neither content, temp
/// file, index entry nor media type (checked with the store itself, once the server has
/// stopped), and nothing corrupt.
fn assert_nothing_of(cache: &std::path::Path, digest: &str) {
    let store = ::stowage::cache::BlobStore::open(cache).expect("open the cache");
    let d: ::stowage::oci::Digest = digest.parse().unwrap();
    assert!(
        !store.contains(&d),
        "a blob the disk could not hold is cached"
    );
    assert!(store.index.get(&d).is_none(), "indexed without content");
    // (Membership rows may exist: they record what upstream said about the repository,
    // for access decisions, and claim no content.)
    assert_eq!(store.media_type(&d).unwrap(), None);
    assert_eq!(store.verify(|_, _, _| {}).unwrap().corrupt, 0);
    assert!(files_under(&cache.join("tmp")).is_empty());
}

/// A blob `GET` in `s`, answered up to its response head (the body left to read).
async fn blob_head_only(s: &Session, digest: &str) -> http::Response<hyper::body::Incoming> {
    let auth = format!("Bearer {}", s.token);
    s.tunnel
        .send(
            Method::GET,
            &s.blob_path(digest),
            &[("authorization", &auth)],
        )
        .await
        .unwrap()
}

/// The whole cache directory (blobs, temp files and metadata: one disk) on an 8 MiB
/// tmpfs, and a 20 MiB blob sent without `Content-Length`, so Stowage cannot see up front
/// that it will not fit: the disk fills part-way through the fill. Both the client whose
/// request started the fill and one coalesced onto it get every byte, verified; nothing
/// of it stays in the cache; once the space is back, the next blob fills normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_mid_fill_still_delivers_the_whole_blob() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = cache_on_tmpfs(dir.path(), "8m", "a_disk_that_fills_mid_fill") else {
        return;
    };
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(20 << 20, 90);
    let digest = quay.push_blob("team/app", data.clone());
    quay.send_unsized(true);
    let stowage = Stowage::builder()
        .trust(&ca)
        .cache_dir(fs.path())
        .cache("min_free = \"256KiB\"")
        .upstream("idle_timeout = \"1s\"")
        .start()
        .await;
    let client = stowage.client();
    let s1 = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let s2 = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::H2).await;
    let s3 = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::H2).await;
    let gate = quay.hold_blob_bodies();
    let leader = bounded("leader head", blob_head_only(&s1, &digest)).await;
    assert_eq!(leader.headers().get("x-cache").unwrap(), "miss");
    let follower = bounded("follower head", blob_head_only(&s2, &digest)).await;
    assert_eq!(follower.headers().get("x-cache").unwrap(), "coalesced");
    // A third reader takes the head and then reads nothing: it must not hold the others
    // up for longer than the idle timeout, nor ever see its body complete.
    let sleeper = bounded("sleeper head", blob_head_only(&s3, &digest)).await;
    assert_eq!(sleeper.headers().get("x-cache").unwrap(), "coalesced");
    gate.open();
    let started = Instant::now();
    let (a, b) = bounded(
        "both bodies",
        futures_util::future::join(
            client::read_response(leader),
            client::read_response(follower),
        ),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a reader that stopped held the others up: {:?}",
        started.elapsed()
    );
    let slept = bounded("the sleeper wakes", client::read_response(sleeper)).await;
    assert!(
        slept.body_error.is_some() && slept.body.len() < data.len(),
        "a reader cut off for not reading saw {} bytes end cleanly",
        slept.body.len()
    );
    assert!(slept.body[..] == data[..slept.body.len()], "wrong bytes");
    for (who, r) in [("leader", &a), ("follower", &b)] {
        assert_eq!(r.status, StatusCode::OK, "{who}");
        assert!(
            r.body_error.is_none(),
            "{who}: cut short after {} of {} bytes: {:?}",
            r.body.len(),
            data.len(),
            r.body_error
        );
        assert_eq!(r.body.len(), data.len(), "{who}");
        assert_eq!(sha256_digest(&r.body), digest, "{who}: wrong bytes");
    }
    assert_eq!(quay.blob_gets(), 1, "one upstream download for both");
    eventually("the abandoned temp file removed", || {
        stowage.temp_files().is_empty()
    })
    .await;
    assert!(!stowage.is_cached(&digest));
    let m = metrics(&stowage).await;
    assert_eq!(
        metric(
            &m,
            "stowage_cache_write_errors_total",
            &[("reason", "disk_full")]
        ),
        1.0,
        "one disk-full per fill: {m}"
    );
    assert_eq!(metric(&m, "stowage_fills_in_flight", &[]), 0.0, "{m}");
    assert_eq!(metric(&m, "stowage_digest_mismatches_total", &[]), 0.0);

    // The space comes back once the abandoned temp file is closed: then the next blob
    // fills normally.
    eventually("the space is back", || fs.free() > 6 << 20).await;
    quay.send_unsized(false);
    let small = pseudo_random(1 << 20, 91);
    let ds = quay.push_blob("team/app", small.clone());
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let r = bounded("after the space came back", s.blob(&ds)).await;
    assert_eq!(r.x_cache(), "miss");
    assert_eq!(sha256_digest(&r.body), ds);
    eventually("cached again", || stowage.is_cached(&ds)).await;
    assert_eq!(bounded("hit", s.blob(&ds)).await.x_cache(), "hit");
    bounded("stop", stowage.stop()).await.unwrap();
    assert_nothing_of(fs.path(), &digest);
}

/// The disk fills during a fill of a blob whose size was announced and fitted (another
/// writer took the space): the client still gets it whole, and it is not cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_by_another_writer_mid_fill_still_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = cache_on_tmpfs(dir.path(), "8m", "a_disk_filled_by_another_writer") else {
        return;
    };
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(3 << 20, 92);
    let digest = quay.push_blob("team/app", data.clone());
    let stowage = Stowage::builder()
        .trust(&ca)
        .cache_dir(fs.path())
        .cache("min_free = \"256KiB\"")
        .start()
        .await;
    let client = stowage.client();
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::H2).await;
    let gate = quay.hold_blob_bodies();
    let head = bounded(
        "head",
        s.tunnel.send(
            Method::GET,
            &s.blob_path(&digest),
            &[("authorization", &format!("Bearer {}", s.token))],
        ),
    )
    .await
    .unwrap();
    assert_eq!(head.headers().get("x-cache").unwrap(), "miss");
    eventually("the fill started", || stowage.temp_files().len() == 1).await;
    let filler = fs.fill_up("filler");
    gate.open();
    let r = bounded("body", client::read_response(head)).await;
    r.assert_complete();
    assert_eq!(sha256_digest(&r.body), digest, "wrong bytes");
    eventually("the temp file removed", || stowage.temp_files().is_empty()).await;
    assert!(!stowage.is_cached(&digest));
    let m = metrics(&stowage).await;
    assert_eq!(
        metric(
            &m,
            "stowage_cache_write_errors_total",
            &[("reason", "disk_full")]
        ),
        1.0,
        "{m}"
    );
    // Space again: the same blob fills now.
    std::fs::remove_file(&filler).unwrap();
    eventually("the space is back", || fs.free() > 6 << 20).await;
    let r = bounded("retry", s.blob(&digest)).await;
    assert_eq!(sha256_digest(&r.body), digest);
    eventually("cached after the space came back", || {
        stowage.is_cached(&digest)
    })
    .await;
    bounded("stop", stowage.stop()).await.unwrap();
}

/// The disk is already full when the request comes: streamed through whole, not a 5xx,
/// and nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_already_full_streams_through() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = cache_on_tmpfs(dir.path(), "4m", "a_disk_already_full") else {
        return;
    };
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(2 << 20, 93);
    let digest = quay.push_blob("team/app", data.clone());
    let stowage = Stowage::builder()
        .trust(&ca)
        .cache_dir(fs.path())
        .cache("min_free = \"256KiB\"")
        .start()
        .await;
    let client = stowage.client();
    let _filler = fs.fill_up("filler");
    for (sized, alpn) in [(true, Alpn::Http11), (false, Alpn::H2)] {
        quay.send_unsized(!sized);
        let s = Session::login(&client, "quay.io", quay.port(), "team/app", alpn).await;
        let r = bounded("full disk", s.blob(&digest)).await;
        assert_eq!(r.status, StatusCode::OK, "sized {sized}: {}", r.text());
        r.assert_complete();
        assert_eq!(sha256_digest(&r.body), digest, "sized {sized}");
        assert_eq!(r.x_cache(), "miss");
        assert!(stowage.temp_files().is_empty());
        assert!(!stowage.is_cached(&digest));
    }
    let m = metrics(&stowage).await;
    assert!(
        metric(
            &m,
            "stowage_cache_write_errors_total",
            &[("reason", "disk_full")]
        ) >= 2.0,
        "{m}"
    );
    bounded("stop", stowage.stop()).await.unwrap();
    assert_nothing_of(fs.path(), &digest);
}

// --- Redirects, storage hosts and token services that misbehave ----------------------------

/// A registry that redirects every blob `GET` to `storage`, with one blob pushed.
async fn redirecting_registry(
    ca: &TestCa,
    storage: &FakeStorage,
    data: &[u8],
) -> (FakeRegistry, String) {
    let quay = FakeRegistry::builder(ca)
        .host("quay.io")
        .storage(storage)
        .blob_mode(BlobMode::Redirect(Location::Absolute))
        .build()
        .await;
    let digest = quay.push_blob("team/app", data.to_vec());
    (quay, digest)
}

/// Both ways a blob leaves Stowage: through a fill, and passed through uncached (the
/// disk "full"), verified on the way.
const FILL_AND_PASS_THROUGH: [(&str, &str); 2] = [
    ("fill", "min_free = \"0B\""),
    ("pass-through", "min_free = \"1000TiB\""),
];

/// The storage host a blob is redirected to resets the connection half-way: no client
/// gets a body presented as complete, the registry's `Authorization` never reaches it,
/// nothing is cached, and once storage is healthy the same blob is served and cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_resets_mid_body_after_a_redirect() {
    let ca = TestCa::new();
    let data = pseudo_random(600_000, 40);
    for (how, cache_line) in FILL_AND_PASS_THROUGH {
        let storage = FakeStorage::start(&ca).await;
        let (quay, digest) = redirecting_registry(&ca, &storage, &data).await;
        storage.set_fault(&digest, Fault::ResetAfter(300_000));
        let stowage = Stowage::builder()
            .trust(&ca)
            .cache(cache_line)
            .start()
            .await;
        let client = stowage.client();
        for (i, alpn) in [Alpn::Http11, Alpn::H2].into_iter().enumerate() {
            let what = format!("{how}: reset after a redirect over {alpn:?}");
            let s = Session::login(&client, "quay.io", quay.port(), "team/app", alpn).await;
            let r = bounded(
                &what,
                s.request_raw(Method::GET, &s.blob_path(&digest), &[]),
            )
            .await;
            assert_not_delivered_complete(&r, data.len(), &what);
            assert_prefix(&r, &data, &what);
            assert_eq!(quay.count_status(Kind::Blob, 307), i + 1, "{what}");
            assert_eq!(storage.gets(), i + 1, "{what}: {:#?}", storage.requests());
            assert!(
                !storage.saw_authorization(),
                "{what}: registry credentials sent to storage"
            );
            assert_clean(&stowage, &digest).await;
        }
        storage.clear_fault(&digest);
        let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
        if how == "fill" {
            assert_recovers(&stowage, &s, &digest).await;
        } else {
            let r = bounded("healed pass-through", s.blob(&digest)).await;
            assert_eq!(sha256_digest(&r.body), digest);
            assert!(stowage.cached_files().is_empty());
        }
    }
}

/// A storage host that sends the announced length with the last KiB inverted: no client
/// gets it as a complete body, nothing is cached, and each mismatch is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_with_wrong_bytes_at_the_end_is_never_delivered_complete() {
    let ca = TestCa::new();
    let data = pseudo_random(500_000, 41);
    for (how, cache_line) in FILL_AND_PASS_THROUGH {
        let storage = FakeStorage::start(&ca).await;
        let (quay, digest) = redirecting_registry(&ca, &storage, &data).await;
        storage.set_fault(&digest, Fault::FlipTail(1024));
        let stowage = Stowage::builder()
            .trust(&ca)
            .cache(cache_line)
            .start()
            .await;
        let client = stowage.client();
        for (i, alpn) in [Alpn::Http11, Alpn::H2].into_iter().enumerate() {
            let what = format!("{how}: flipped tail over {alpn:?}");
            let s = Session::login(&client, "quay.io", quay.port(), "team/app", alpn).await;
            let r = bounded(
                &what,
                s.request_raw(Method::GET, &s.blob_path(&digest), &[]),
            )
            .await;
            assert_not_delivered_complete(&r, data.len(), &what);
            if let Ok(r) = &r {
                assert!(
                    !r.status.is_success() || r.body_error.is_some(),
                    "{what}: a short body ended without an error"
                );
            }
            assert_eq!(storage.gets(), i + 1, "{what}");
            assert_clean(&stowage, &digest).await;
            // The fill task counts the mismatch as it ends, maybe just after the client's
            // body failed.
            let want = (i + 1) as f64;
            let mut m = String::new();
            for _ in 0..100 {
                m = metrics(&stowage).await;
                if metric(&m, "stowage_digest_mismatches_total", &[]) == want {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(
                metric(&m, "stowage_digest_mismatches_total", &[]),
                want,
                "{what}: {m}"
            );
        }
        assert!(stowage.cached_files().is_empty(), "{how}");
    }
}

/// Redirect loops that `redirect_loops_are_bounded` (one host, one path) does not cover:
/// registry → storage A → storage B → storage A → …, and a storage host redirecting to
/// itself. Both end in a 502 after `max_redirects` hops, and nothing is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_loops_across_hosts_are_bounded() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let (a, b) = (FakeStorage::start(&ca).await, FakeStorage::start(&ca).await);
    let cross = quay.push_blob("team/app", pseudo_random(10_000, 42));
    let own = quay.push_blob("team/app", pseudo_random(10_000, 43));
    let url = |port: u16, d: &str| format!("https://storage.test:{port}/blobs/{d}?sig=loop");
    for d in [&cross, &own] {
        a.put(pseudo_random(10_000, if d == &cross { 42 } else { 43 }));
        quay.set_fault(d, Fault::RedirectTo(url(a.port(), d)));
    }
    a.set_fault(&cross, Fault::RedirectTo(url(b.port(), &cross)));
    b.put(pseudo_random(10_000, 42));
    b.set_fault(&cross, Fault::RedirectTo(url(a.port(), &cross)));
    a.set_fault(&own, Fault::RedirectTo(url(a.port(), &own)));
    let stowage = Stowage::builder()
        .trust(&ca)
        .upstream("max_redirects = 3")
        .start()
        .await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::H2,
    )
    .await;
    for d in [&cross, &own] {
        let before = a.count_status(307) + b.count_status(307);
        let r = bounded("redirect loop", s.blob(d)).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
        assert!(r.text().contains("redirect"), "{}", r.text());
        // The registry's 307, then three hops between the storage hosts: then it stops.
        assert_eq!(
            a.count_status(307) + b.count_status(307) - before,
            3,
            "{:#?} {:#?}",
            a.requests(),
            b.requests()
        );
        assert_clean(&stowage, d).await;
    }
    assert_eq!(quay.count_status(Kind::Blob, 307), 2);
    assert!(!a.saw_authorization() && !b.saw_authorization());
    a.clear_fault(&cross);
    assert_recovers(&stowage, &s, &cross).await;
}

/// How [`HangingTokens`] misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hang {
    /// Reads the request and never answers.
    Head,
    /// Answers a `200` head and the first bytes of a JSON body, then nothing more.
    Body,
}

/// A token service that hangs (see [`Hang`]), HTTP/1.1 over TLS for every fake host name.
/// It counts the connections still open: one closes when its peer gives up.
struct HangingTokens {
    port: u16,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HangingTokens {
    async fn start(ca: &TestCa, hang: Hang) -> HangingTokens {
        let mut config = (*ca.fake_hosts_config()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (acc, op) = (accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                op.fetch_add(1, Ordering::SeqCst);
                let (acceptor, op) = (acceptor.clone(), op.clone());
                conns.spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let mut buf = vec![0u8; 4096];
                        let mut head = Vec::new();
                        let mut closed = false;
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => {
                                    closed = true;
                                    break;
                                }
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        if !closed && hang == Hang::Body {
                            let _ = tls
                                .write_all(
                                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                      content-length: 1000\r\n\r\n{\"token\": \"",
                                )
                                .await;
                            let _ = tls.flush().await;
                        }
                        // Held until the peer gives up.
                        while !closed {
                            closed = !matches!(tls.read(&mut buf).await, Ok(n) if n > 0);
                        }
                    }
                    op.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        HangingTokens {
            port,
            accepted,
            open,
            task,
        }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for HangingTokens {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One plain HTTP/1.1 `GET` to a mirror listener, as dockerd sends it; the whole response
/// with a body error recorded, or why there was none.
async fn mirror_get(addr: std::net::SocketAddr, path: &str) -> Result<Resp, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .header("user-agent", TEST_USER_AGENT)
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(client::read_response(resp).await)
}

/// A token service that hangs, either way, for the client's own token request (through
/// the proxy, which terminates TLS for a registry's auth host) and for Stowage's own (the
/// mirror answers the challenge itself): each fails within the configured upstream
/// timeouts with a clear error, other requests are served meanwhile, and every
/// connection to the hanging service is closed afterwards (nothing left waiting on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_service_that_hangs_fails_in_bounded_time() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let healthy = quay.push_blob("team/app", pseudo_random(200_000, 44));
    let bound = Duration::from_secs(5);
    for hang in [Hang::Head, Hang::Body] {
        let tokens = HangingTokens::start(&ca, hang).await;
        let reg = FakeRegistry::builder(&ca)
            .host("registry.example.test")
            .realm(&format!("https://auth.example.test:{}/token", tokens.port))
            .build()
            .await;
        let d = reg.push_blob("team/app", pseudo_random(10_000, 45));
        let stowage = Stowage::builder()
            .trust(&ca)
            .upstream("response_timeout = \"1s\"")
            .upstream("idle_timeout = \"1s\"")
            .toml("[mirror]\nlisten = \"127.0.0.1:0\"\n")
            .start()
            .await;
        let client = stowage.client();
        let t = client
            .tunnel("auth.example.test", tokens.port, Alpn::Http11)
            .await
            .unwrap();
        let own = tokio::spawn(async move {
            let started = Instant::now();
            let r = t
                .request_raw(
                    Method::GET,
                    "/token?service=fake&scope=repository%3Ateam%2Fapp%3Apull",
                    &[],
                )
                .await;
            (r, started.elapsed())
        });
        let mirror = stowage.mirror_addr.unwrap();
        let path = format!(
            "/v2/team/app/blobs/{d}?ns=registry.example.test:{}",
            reg.port()
        );
        let mirrored = tokio::spawn(async move {
            let started = Instant::now();
            (mirror_get(mirror, &path).await, started.elapsed())
        });
        // Meanwhile: served as usual.
        let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::H2).await;
        let r = bounded("a healthy pull meanwhile", s.blob(&healthy)).await;
        assert_eq!(sha256_digest(&r.body), healthy);
        assert_eq!(client.proxy_get("/healthz").await.status, StatusCode::OK);

        let (r, took) = bounded("the client's token request", own).await.unwrap();
        assert!(
            took < bound,
            "{hang:?}: the client's token request took {took:?}"
        );
        match (&r, hang) {
            (Ok(r), Hang::Head) => {
                assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
                assert!(r.json()["errors"][0]["message"].is_string());
            }
            (Ok(r), Hang::Body) => assert!(
                r.body_error.is_some(),
                "a stalled token body ended cleanly: {} {:?}",
                r.status,
                r.body
            ),
            (Err(e), _) => panic!("{hang:?}: no response head at all: {e}"),
        }
        let (r, took) = bounded("the mirror's token request", mirrored)
            .await
            .unwrap();
        assert!(
            took < bound,
            "{hang:?}: the mirror's token request took {took:?}"
        );
        let r = r.unwrap_or_else(|e| panic!("{hang:?}: mirror request failed: {e}"));
        assert!(
            r.status.is_server_error(),
            "{hang:?}: mirror answered {}: {}",
            r.status,
            r.text()
        );
        assert!(r.json()["errors"][0]["message"].is_string(), "{}", r.text());
        assert!(
            tokens.accepted() >= 2,
            "{hang:?}: {} connections",
            tokens.accepted()
        );
        eventually(
            "every connection to the hanging token service closed",
            || tokens.open() == 0,
        )
        .await;
        assert_eq!(reg.blob_gets(), 1, "{:#?}", reg.requests());
    }
}

// --- kill -9 of the real binary -------------------------------------------------------------

/// The `stowage` binary (`CARGO_BIN_EXE_stowage`) with its own config file and a cache
/// that outlives the processes run on it, as in tests/lifecycle.rs.
struct Binary {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

/// One running `stowage` process; killed when dropped.
struct Running {
    child: std::process::Child,
    client: ProxyClient,
}

impl Binary {
    fn new(ca: &TestCa) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let q = |p: &std::path::Path| format!("{:?}", p.to_str().unwrap());
        let mut toml = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n\n[ca]\ndir = {}\n\n[cache]\ndir = {}\n\n[upstream]\nextra_ca = [{}]\nconnect_timeout = \"2s\"\n\n[upstream.resolve]\n",
            q(&dir.path().join("certs")),
            q(&dir.path().join("cache")),
            q(ca.pem_path()),
        );
        for h in FAKE_HOSTS {
            toml.push_str(&format!("{h:?} = \"127.0.0.1\"\n"));
        }
        let config = dir.path().join("config.toml");
        std::fs::write(&config, toml).unwrap();
        Binary { dir, config }
    }

    fn cache(&self) -> std::path::PathBuf {
        self.dir.path().join("cache")
    }

    /// Starts `stowage --config ...` and waits for its proxy listener.
    fn start(&self) -> Running {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn stowage");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening") && line.contains("listener=\"proxy\"") {
                    if let Some(i) = line.find("127.0.0.1:") {
                        let port: String = line[i + 10..]
                            .chars()
                            .take_while(|c| c.is_ascii_digit())
                            .collect();
                        let _ = tx.send(format!("127.0.0.1:{port}"));
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(BOUND) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!("stowage did not report its proxy listener");
            }
        };
        let ca_pem = std::fs::read_to_string(self.dir.path().join("certs/ca.crt")).unwrap();
        Running {
            child,
            client: ProxyClient::via_proxy(addr, &ca_pem),
        }
    }

    /// `stowage --config ... <args>` on a stopped cache.
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "$ stowage {}\n{text}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

impl Running {
    fn kill9(mut self) {
        use std::os::unix::process::ExitStatusExt;
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }

    /// SIGTERM, and a clean exit within the bound.
    fn stop(mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + BOUND;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "stowage did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every file under `blobs/` is `sha256/<2 hex>/<hex>` and hashes to its name; returns
/// the digests.
fn assert_only_true_content(cache: &std::path::Path) -> Vec<String> {
    let blobs = cache.join("blobs");
    let mut digests = Vec::new();
    for p in files_under(&blobs) {
        let rel = p.strip_prefix(&blobs).unwrap().to_str().unwrap().to_owned();
        let parts: Vec<&str> = rel.split('/').collect();
        assert!(
            parts.len() == 3 && parts[0] == "sha256" && parts[2].starts_with(parts[1]),
            "not content: {rel}"
        );
        let d = format!("sha256:{}", parts[2]);
        assert_eq!(
            sha256_digest(&std::fs::read(&p).unwrap()),
            d,
            "a cached object does not hash to its name: {rel}"
        );
        digests.push(d);
    }
    digests
}

/// A GET in `s` of `path`: `Some` when complete with the bytes of `digest`, `None`
/// when the response failed (the process went away), and a panic on wrong bytes.
async fn pull_checked(
    s: &Session,
    path: &str,
    digest: &str,
    accept: &[(&str, &str)],
) -> Option<()> {
    let r = s.request_raw(Method::GET, path, accept).await.ok()?;
    if r.status != StatusCode::OK || r.body_error.is_some() {
        return None;
    }
    assert_eq!(
        sha256_digest(&r.body),
        digest,
        "wrong bytes served for {path}"
    );
    Some(())
}

/// `kill -9` of the real binary while 100 clients pull (fills in flight, coalesced readers
/// on them, hits), then a restart on the same cache: no temp file survives, every object
/// on disk hashes to its name, every object pulled again hashes to its digest, and
/// `stowage cache verify` and `cache ls` find nothing corrupt or missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_100_concurrent_pulls_then_restart_serves_only_true_bytes() {
    const CLIENTS: usize = 100;
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let images: Arc<Vec<Image>> = Arc::new(
        (0..5u64)
            .map(|i| {
                let layers: Vec<Vec<u8>> = (0..3u64)
                    .map(|j| pseudo_random(150_000 + 100_000 * j as usize, 600 + i * 10 + j))
                    .collect();
                quay.push_image("team/app", &format!("v{i}"), &layers)
            })
            .collect(),
    );
    // Slow enough that fills are in flight at the kill.
    quay.set_chunking(16 * 1024, Duration::from_millis(4));
    let bin = Binary::new(&ca);
    let p = bin.start();
    let port = quay.port();
    let sessions = bounded(
        "100 logins",
        futures_util::future::join_all((0..CLIENTS).map(|i| {
            let alpn = if i % 2 == 0 { Alpn::Http11 } else { Alpn::H2 };
            Session::login(&p.client, "quay.io", port, "team/app", alpn)
        })),
    )
    .await;
    let accept = format!("{}, {}", registry::OCI_MANIFEST, registry::DOCKER_MANIFEST);
    let served = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let (images, served, accept) = (images.clone(), served.clone(), accept.clone());
            tokio::spawn(async move {
                let img = &images[i % images.len()];
                let tag = format!("v{}", i % images.len());
                let h = [("accept", accept.as_str())];
                loop {
                    pull_checked(&s, &s.manifest_path(&tag), &img.manifest, &h).await?;
                    served.fetch_add(1, Ordering::SeqCst);
                    for d in img.blobs() {
                        pull_checked(&s, &s.blob_path(&d), &d, &[]).await?;
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                }
                #[allow(unreachable_code)]
                Some(())
            })
        })
        .collect();
    eventually("fills under way", || quay.blob_gets() >= 8).await;
    let in_flight = files_under(&bin.cache().join("tmp")).len();
    p.kill9();
    for w in workers {
        // A worker ends when the process is gone; a panic here is wrong bytes served.
        let _ = bounded("a worker to notice", w)
            .await
            .expect("a worker saw wrong bytes");
    }
    eprintln!(
        "killed with {in_flight} temp files, after {} objects served",
        served.load(Ordering::SeqCst)
    );

    let p = bin.start();
    assert!(
        files_under(&bin.cache().join("tmp")).is_empty(),
        "temp files survived the restart"
    );
    let survivors = assert_only_true_content(&bin.cache());
    let s = Session::login(&p.client, "quay.io", port, "team/app", Alpn::H2).await;
    let h = [("accept", accept.as_str())];
    for (i, img) in images.iter().enumerate() {
        let by_tag = bounded(
            "manifest by tag",
            s.get(&s.manifest_path(&format!("v{i}")), &h),
        )
        .await;
        assert_eq!(sha256_digest(&by_tag.body), img.manifest);
        for d in std::iter::once(img.manifest.clone()).chain(img.blobs()) {
            let path = if d == img.manifest {
                s.manifest_path(&d)
            } else {
                s.blob_path(&d)
            };
            let r = bounded("pull after the restart", s.get(&path, &h)).await;
            assert_eq!(r.status, StatusCode::OK, "{d}: {}", r.text());
            assert_eq!(sha256_digest(&r.body), d, "wrong bytes after the restart");
            if survivors.contains(&d) {
                assert_eq!(
                    r.x_cache(),
                    "hit",
                    "{d} survived but was not served from disk"
                );
            }
        }
    }
    let all: Vec<String> = images
        .iter()
        .flat_map(|i| std::iter::once(i.manifest.clone()).chain(i.blobs()))
        .collect();
    eventually("everything stored", || {
        all.iter().all(|d| {
            let hex = &d[7..];
            bin.cache()
                .join("blobs/sha256")
                .join(&hex[..2])
                .join(hex)
                .is_file()
        })
    })
    .await;
    p.stop();
    assert_eq!(assert_only_true_content(&bin.cache()).len(), all.len());
    let (ok, text) = bin.cli(&["cache", "verify"]);
    assert!(
        ok && text.contains(&format!("verified {} objects", all.len()))
            && text.contains(" 0 corrupt"),
        "{text}"
    );
    let (ok, text) = bin.cli(&["cache", "ls", "--json"]);
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = v.as_array().expect("a list");
    assert!(!rows.is_empty(), "{v}");
    assert!(rows.iter().all(|r| r["missing"] == 0), "{v}");
}
