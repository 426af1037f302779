//! End-to-end tests of the forward proxy: a real Stowage on 127.0.0.1:0 between a test
//! client and in-process fake registries (see `common`). Each test asserts on what the
//! fakes counted, the bytes and the headers the client got, and the cache directory.

mod common;

use std::time::{Duration, Instant};

use common::registry::OCI_MANIFEST;
use common::*;
use futures_util::future::join_all;
use http::{Method, StatusCode, Version};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_pull_is_served_from_the_cache() {
    let ca = TestCa::new();
    let hub = FakeRegistry::builder(&ca)
        .host("registry-1.docker.io")
        .realm_host("auth.docker.io")
        .build()
        .await;
    let img = hub.push_image(
        "library/app",
        "1.0",
        &[pseudo_random(300_000, 1), pseudo_random(70_000, 2)],
    );
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();

    let first = pull(
        &client,
        "registry-1.docker.io",
        hub.port(),
        "library/app",
        "1.0",
        Alpn::Http11,
    )
    .await;
    assert_eq!(first.manifest_digest, img.manifest);
    assert_eq!(
        first
            .blobs
            .iter()
            .map(|(d, _)| d.clone())
            .collect::<Vec<_>>(),
        img.blobs()
    );
    assert_eq!(first.blob_x_cache(), ["miss", "miss", "miss"]);
    assert_eq!(
        hub.blob_gets(),
        3,
        "each blob downloaded once: {:#?}",
        hub.requests()
    );
    // The token request went through a tunnel to the auth host.
    let tokens: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.kind == Kind::Token && r.by_client())
        .collect();
    assert_eq!(tokens.len(), 1);
    assert!(
        tokens[0].host.starts_with("auth.docker.io"),
        "{:?}",
        tokens[0]
    );
    for d in img.blobs() {
        eventually(&format!("{d} stored in the cache"), || {
            stowage.is_cached(&d)
        })
        .await;
        assert_eq!(
            std::fs::read(stowage.blob_path(&d)).unwrap(),
            first.blobs.iter().find(|(x, _)| *x == d).unwrap().1.body
        );
    }

    let seen = hub.requests().len();
    let second = pull(
        &client,
        "registry-1.docker.io",
        hub.port(),
        "library/app",
        "1.0",
        Alpn::Http11,
    )
    .await;
    assert_eq!(second.manifest_digest, img.manifest);
    assert_eq!(second.blob_x_cache(), ["hit", "hit", "hit"]);
    let blob_requests: Vec<_> = hub.requests()[seen..]
        .iter()
        .filter(|r| r.kind == Kind::Blob)
        .cloned()
        .collect();
    assert!(
        blob_requests.is_empty(),
        "the second pull reached upstream for blobs: {blob_requests:#?}"
    );
    assert_eq!(hub.blob_gets(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_digest_from_two_registries_is_downloaded_once() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let ghcr = FakeRegistry::builder(&ca).host("ghcr.io").build().await;
    let layer = pseudo_random(500_000, 3);
    let digest = quay.push_blob("team/app", layer.clone());
    assert_eq!(ghcr.push_blob("org/tool", layer.clone()), digest);
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();

    let q = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let r = q.blob(&digest).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.x_cache(), "miss");
    assert_eq!(sha256_digest(&r.body), digest);
    eventually("the layer stored", || stowage.is_cached(&digest)).await;

    let g = Session::login(&client, "ghcr.io", ghcr.port(), "org/tool", Alpn::H2).await;
    let r = g.blob(&digest).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.x_cache(), "hit");
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(sha256_digest(&r.body), digest);
    assert_eq!(
        quay.blob_gets() + ghcr.blob_gets(),
        1,
        "quay: {:#?}\nghcr: {:#?}",
        quay.requests(),
        ghcr.requests()
    );
    assert_eq!(ghcr.blob_gets(), 0);
    assert_eq!(
        stowage
            .cached_files()
            .iter()
            .filter(|p| p.ends_with(&digest[7..]))
            .count(),
        1
    );
}

/// The client must not get the whole announced body when it does not match its digest.
fn assert_aborted(r: &Resp, expected_len: usize, what: &str) {
    let complete = r.body_error.is_none() && r.body.len() >= expected_len;
    assert!(
        !complete,
        "{what}: a corrupt blob was delivered complete (status {}, {} bytes, X-Cache {})",
        r.status,
        r.body.len(),
        r.x_cache()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_blob_is_neither_cached_nor_delivered_complete() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(256 * 1024, 4);
    let digest = quay.push_blob("team/app", data.clone());
    quay.corrupt_blob(&digest);
    // Every byte reaches Stowage well before upstream's end of stream does: a proxy that
    // forwards bytes before verifying them has time to send the client all of them.
    quay.set_tail_delay(Duration::from_millis(300));
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();

    for (i, alpn) in [Alpn::Http11, Alpn::H2].into_iter().enumerate() {
        let s = Session::login(&client, "quay.io", quay.port(), "team/app", alpn).await;
        let r = s.request_raw(Method::GET, &s.blob_path(&digest), &[]).await;
        match r {
            // Refusing before the head is fine too, as long as it is not a success.
            Ok(r) if r.status.is_success() => assert_aborted(&r, data.len(), &format!("{alpn:?}")),
            Ok(r) => assert!(
                r.status.is_server_error(),
                "{alpn:?}: unexpected {}",
                r.status
            ),
            Err(_) => {}
        }
        assert_eq!(
            quay.blob_gets(),
            i + 1,
            "{alpn:?}: the corrupt blob was not fetched upstream again"
        );
        eventually("the temp file deleted", || stowage.temp_files().is_empty()).await;
        assert!(
            !stowage.is_cached(&digest),
            "{alpn:?}: a corrupt blob was cached"
        );
        assert!(
            stowage.cached_files().is_empty(),
            "{alpn:?}: {:?}",
            stowage.cached_files()
        );
    }

    // Upstream fixed: the next request goes upstream again, and is then cached.
    quay.heal(&digest);
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let r = s.blob(&digest).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.x_cache(), "miss");
    assert_eq!(sha256_digest(&r.body), digest);
    assert_eq!(quay.blob_gets(), 3);
    eventually("the good blob stored", || stowage.is_cached(&digest)).await;
    assert_eq!(s.blob(&digest).await.x_cache(), "hit");
    assert_eq!(quay.blob_gets(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_gets_share_one_download() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(8 << 20, 5);
    let digest = quay.push_blob("team/big", data.clone());
    quay.set_chunking(256 * 1024, Duration::from_millis(2));
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();

    let s = Session::login(&client, "quay.io", quay.port(), "team/big", Alpn::Http11).await;
    let auth = format!("Bearer {}", s.token);
    // Eight connections, like Go clients open, half of them h2.
    let tunnels = join_all((0..8).map(|i| {
        let client = client.clone();
        let port = quay.port();
        async move {
            client
                .tunnel(
                    "quay.io",
                    port,
                    if i % 2 == 0 { Alpn::Http11 } else { Alpn::H2 },
                )
                .await
                .unwrap()
        }
    }))
    .await;
    // Upstream sends its head and first chunk, then waits: every request is in flight at
    // once, deterministically.
    let gate = quay.hold_blob_bodies();
    let path = s.blob_path(&digest);
    let headers = [("authorization", auth.as_str())];
    let heads = tokio::time::timeout(
        Duration::from_secs(10),
        join_all(tunnels.iter().map(|t| t.send(Method::GET, &path, &headers))),
    )
    .await
    .expect(
        "response heads must arrive while upstream is still sending (streaming, not buffering)",
    );
    gate.open();
    let responses = join_all(
        heads
            .into_iter()
            .map(|h| client::read_response(h.expect("request"))),
    )
    .await;

    let mut outcomes = Vec::new();
    for r in &responses {
        assert_eq!(r.status, StatusCode::OK);
        r.assert_complete();
        assert_eq!(r.body.len(), data.len());
        assert_eq!(sha256_digest(&r.body), digest);
        outcomes.push(r.x_cache().to_owned());
    }
    assert_eq!(
        quay.blob_gets(),
        1,
        "one upstream download; outcomes {outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| *o == "miss").count(),
        1,
        "{outcomes:?}"
    );
    assert!(outcomes.iter().any(|o| o == "coalesced"), "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| o == "miss" || o == "coalesced" || o == "hit"),
        "{outcomes:?}"
    );
    eventually("the blob stored", || stowage.is_cached(&digest)).await;
    assert_eq!(s.blob(&digest).await.x_cache(), "hit");
    assert_eq!(quay.blob_gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_on_a_hit() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(64 * 1024, 6);
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
    eventually("the blob stored", || stowage.is_cached(&digest)).await;
    let path = s.blob_path(&digest);

    let r = s.get(&path, &[("range", "bytes=100-199")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.x_cache(), "hit");
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 100-199/{len}").as_str())
    );
    assert_eq!(r.content_length(), Some(100));
    assert_eq!(&r.body[..], &data[100..200]);

    let r = s.get(&path, &[("range", "bytes=-100")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {}-{}/{len}", len - 100, len - 1).as_str())
    );
    assert_eq!(&r.body[..], &data[len - 100..]);

    let r = s
        .get(&path, &[("range", &format!("bytes={}-", len - 10))])
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.body[..], &data[len - 10..]);

    let r = s.get(&path, &[("range", &format!("bytes={len}-"))]).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{len}").as_str())
    );

    assert_eq!(quay.blob_gets(), 1, "ranges on a hit are served locally");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_redirects_are_followed_without_the_registry_token() {
    let ca = TestCa::new();
    let storage = FakeStorage::start(&ca).await;
    let quay = FakeRegistry::builder(&ca)
        .host("quay.io")
        .storage(&storage)
        .blob_mode(BlobMode::Redirect(Location::Absolute))
        .build()
        .await;
    let a = pseudo_random(300_000, 7);
    let b = pseudo_random(100_000, 8);
    let c = pseudo_random(50_000, 9);
    let (da, db, dc) = (
        quay.push_blob("team/app", a.clone()),
        quay.push_blob("team/app", b.clone()),
        quay.push_blob("team/app", c.clone()),
    );
    let stowage = Stowage::start(&ca).await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::Http11,
    )
    .await;

    // Absolute Location on another host.
    let r = s.blob(&da).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sha256_digest(&r.body), da);
    assert_eq!(storage.gets(), 1, "Stowage followed the redirect itself");
    let reg = quay
        .requests()
        .into_iter()
        .find(|r| r.kind == Kind::Blob && r.method == Method::GET)
        .unwrap();
    assert!(
        reg.authorization.is_some(),
        "the registry got the client's token"
    );
    assert!(
        !storage.saw_authorization(),
        "the registry token leaked to storage: {:#?}",
        storage.requests()
    );

    // Scheme-relative Location on another host.
    quay.set_blob_mode(BlobMode::Redirect(Location::SchemeRelative));
    let r = s.blob(&db).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sha256_digest(&r.body), db);
    assert_eq!(storage.gets(), 2);
    assert!(!storage.saw_authorization(), "{:#?}", storage.requests());

    // Path-relative Location on the registry itself.
    quay.set_blob_mode(BlobMode::Redirect(Location::PathRelative));
    let r = s.blob(&dc).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sha256_digest(&r.body), dc);
    assert_eq!(quay.storage_gets(), 1);

    for d in [&da, &db, &dc] {
        eventually("redirected blobs stored", || stowage.is_cached(d)).await;
    }
    assert_eq!(s.blob(&da).await.x_cache(), "hit");
    assert_eq!(storage.gets(), 2);
}

/// Blob bodies go upstream over HTTP/1.1 (their own pool), redirect hops to storage too;
/// tokens, manifests and `HEAD`s keep h2. Both fakes offer h2 and HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_bodies_are_fetched_over_http1_and_the_rest_over_h2() {
    let ca = TestCa::new();
    let storage = FakeStorage::start(&ca).await;
    let quay = FakeRegistry::builder(&ca)
        .host("quay.io")
        .storage(&storage)
        .build()
        .await;
    let img = quay.push_image(
        "team/app",
        "1.0",
        &[pseudo_random(200_000, 21), pseudo_random(90_000, 22)],
    );
    let stowage = Stowage::start(&ca).await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::Http11,
    )
    .await;
    let r = s.manifest("1.0").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = s.blob(&img.layers[0]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sha256_digest(&r.body), img.layers[0]);
    // A redirected blob: the hop to storage is HTTP/1.1 as well.
    quay.set_blob_mode(BlobMode::Redirect(Location::Absolute));
    let r = s.blob(&img.layers[1]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sha256_digest(&r.body), img.layers[1]);
    assert_eq!(storage.gets(), 1);

    let seen = quay.requests();
    let versions = |kind: Kind, method: Method| -> Vec<Version> {
        seen.iter()
            .filter(|r| r.kind == kind && r.method == method)
            .map(|r| r.version)
            .collect()
    };
    let blobs = versions(Kind::Blob, Method::GET);
    assert_eq!(blobs.len(), 2, "{seen:#?}");
    assert!(
        blobs.iter().all(|v| *v == Version::HTTP_11),
        "blob GETs: {blobs:?}"
    );
    let manifests = versions(Kind::Manifest, Method::GET);
    assert!(!manifests.is_empty(), "{seen:#?}");
    assert!(
        manifests.iter().all(|v| *v == Version::HTTP_2),
        "manifest GETs: {manifests:?}"
    );
    let tokens = versions(Kind::Token, Method::GET);
    assert!(
        tokens.iter().all(|v| *v == Version::HTTP_2),
        "token GETs: {tokens:?}"
    );
    let hops: Vec<Version> = storage.requests().iter().map(|r| r.version).collect();
    assert_eq!(hops, vec![Version::HTTP_11], "storage hops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_hosts_are_tunnelled_untouched_or_denied() {
    let ca = TestCa::new();
    let (port, accepted, _echo) = echo_server().await;

    // Blind tunnels reach only the configured ports (443 by default).
    let default = Stowage::start(&ca).await;
    let (_, status) = default
        .client()
        .connect_raw(&format!("tunnel.test:{port}"))
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a blind tunnel to a port outside tunnel_ports"
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);

    let stowage = Stowage::builder()
        .trust(&ca)
        .tunnel_ports(&[port])
        .start()
        .await;
    let client = stowage.client();
    echo_through(&client, &format!("tunnel.test:{port}"), 10, 200_000).await;
    // The same service by its loopback address is an internal one: only a pin opens it.
    let (_, status) = client
        .connect_raw(&format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "a blind tunnel to loopback");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

    let deny = Stowage::builder()
        .trust(&ca)
        .other_hosts("deny")
        .tunnel_ports(&[port])
        .start()
        .await;
    let client = deny.client();
    let (_, status) = client
        .connect_raw(&format!("tunnel.test:{port}"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, status) = client
        .connect_raw(&format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a denied CONNECT reached the host"
    );
    // Registries are still served.
    let (_, status) = client
        .connect_raw(&format!("quay.io:{port}"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_and_http11_inside_the_tunnel() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(100_000, 12)]);
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();

    for (alpn, proto, version) in [
        (Alpn::H2, &b"h2"[..], Version::HTTP_2),
        (Alpn::Http11, &b"http/1.1"[..], Version::HTTP_11),
    ] {
        let t = client.tunnel("quay.io", quay.port(), alpn).await.unwrap();
        assert_eq!(t.alpn.as_deref(), Some(proto), "{alpn:?}");
        let s = Session::on(&client, t, "team/app", alpn).await;
        let m = s.manifest("v1").await;
        assert_eq!(m.status, StatusCode::OK);
        assert_eq!(m.version, version);
        assert_eq!(sha256_digest(&m.body), img.manifest);
        let r = s.blob(&img.layers[0]).await;
        assert_eq!(r.version, version);
        assert_eq!(sha256_digest(&r.body), img.layers[0]);
    }
    // A client offering both gets h2 (curl's case).
    let t = client
        .tunnel("quay.io", quay.port(), Alpn::Both)
        .await
        .unwrap();
    assert_eq!(t.alpn.as_deref(), Some(&b"h2"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_leaves_validate_for_the_requested_host() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let ghcr = FakeRegistry::builder(&ca).host("ghcr.io").build().await;
    let stowage = Stowage::start(&ca).await;
    // Trusts only Stowage's CA: a handshake succeeds only with a leaf it signed for this name.
    let client = stowage.client();
    let ca_der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(stowage.ca_pem.as_bytes()).unwrap()
    };

    let mut leaves = Vec::new();
    for (host, port) in [("quay.io", quay.port()), ("ghcr.io", ghcr.port())] {
        assert_ne!(port, 443);
        let t = client
            .tunnel(host, port, Alpn::Both)
            .await
            .unwrap_or_else(|e| panic!("{host}:{port}: {e}"));
        let leaf = t.peer_certs.first().expect("a certificate").clone();
        assert_ne!(
            leaf, ca_der,
            "{host}: the CA certificate itself was presented"
        );
        let (sans, is_ca) = cert_names(&leaf);
        assert_eq!(sans, [host], "{host}: SANs");
        assert!(!is_ca, "{host}: the leaf is a CA");
        leaves.push(leaf);
    }
    assert_ne!(leaves[0], leaves[1], "two registries share a leaf");

    // The same host again: the same leaf (minted once).
    let again = client
        .tunnel("quay.io", quay.port(), Alpn::Http11)
        .await
        .unwrap();
    assert_eq!(again.peer_certs[0], leaves[0]);

    // Upstream's certificate is not passed through: a client trusting only the upstream
    // test CA refuses the tunnel's TLS.
    let upstream_only = ProxyClient::via_proxy(stowage.addr, &ca.cert_pem);
    assert!(upstream_only
        .tls("quay.io", quay.port(), Alpn::Http11)
        .await
        .is_err());
    // And the leaf is for the CONNECT host only.
    let (tcp, status) = client
        .connect_raw(&format!("quay.io:{}", quay.port()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates({
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der.clone()).unwrap();
        roots
    })
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let wrong_name = rustls::pki_types::ServerName::try_from("ghcr.io").unwrap();
    let r = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(wrong_name, tcp)
        .await;
    assert!(
        r.is_err(),
        "a quay.io tunnel presented a certificate valid for ghcr.io"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_serves_its_own_endpoints() {
    let ca = TestCa::new();
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();

    let r = client.proxy_get("/ca.crt").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), stowage.ca_pem);
    assert!(r.text().starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(
        std::fs::read_to_string(stowage.ca_dir.join("ca.crt")).unwrap(),
        stowage.ca_pem
    );
    assert!(!r.text().contains("PRIVATE KEY"));

    assert_eq!(client.proxy_get("/healthz").await.status, StatusCode::OK);
    assert_eq!(
        client.proxy_get("/nope").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        client.proxy_get("/ca.key").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_cached_blob_is_answered_locally() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(123_457, 13);
    let digest = quay.push_blob("team/app", data.clone());
    let stowage = Stowage::start(&ca).await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::Http11,
    )
    .await;
    assert_eq!(s.blob(&digest).await.x_cache(), "miss");
    eventually("the blob stored", || stowage.is_cached(&digest)).await;

    // The filter below relies on Stowage forwarding the client's User-Agent upstream.
    assert!(quay
        .requests()
        .iter()
        .any(|r| r.kind == Kind::Blob && r.method == Method::GET && r.by_client()));
    let seen = quay.requests().len();
    let r = s.request(Method::HEAD, &s.blob_path(&digest), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.x_cache(), "hit");
    assert_eq!(r.content_length(), Some(data.len() as u64));
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert!(r.body.is_empty());
    // Stowage's own background requests (no test User-Agent) aside, nothing went upstream.
    let upstream: Vec<_> = quay.requests()[seen..]
        .iter()
        .filter(|r| r.by_client())
        .cloned()
        .collect();
    assert!(
        upstream.is_empty(),
        "HEAD of a cached blob went upstream: {upstream:#?}"
    );
    assert_eq!(quay.blob_gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502_with_registry_json() {
    let ca = TestCa::new();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let t = client
        .tunnel("quay.io", closed, Alpn::Http11)
        .await
        .expect("a registry tunnel opens even when upstream is down");
    let digest = sha256_digest(b"anything");
    // The version check alone is answered by Stowage itself (issue 15), marked stale.
    let ping = t.get("/v2/", &[]).await;
    assert_eq!((ping.status, ping.x_cache()), (StatusCode::OK, "stale"));
    for path in [
        format!("/v2/team/app/blobs/{digest}"),
        "/v2/team/app/manifests/latest".to_owned(),
    ] {
        let started = Instant::now();
        let r = t.get(&path, &[("authorization", "Bearer whatever")]).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{path}: {}", r.text());
        assert!(
            r.header("content-type").unwrap_or("").contains("json"),
            "{path}: {:?}",
            r.headers
        );
        let v = r.json();
        let errors = v["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: no errors array: {v}"));
        assert!(!errors.is_empty());
        assert!(
            errors[0]["code"].is_string() && errors[0]["message"].is_string(),
            "{v}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path}: took {:?}",
            started.elapsed()
        );
    }
    assert!(stowage.cached_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_by_digest_are_cached_with_their_media_type() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(1000, 14)]);
    let stowage = Stowage::start(&ca).await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::H2,
    )
    .await;
    let by_digest = |r: &&Recorded| {
        r.kind == Kind::Manifest && r.method == Method::GET && r.path.ends_with(&img.manifest)
    };

    let r = s.manifest(&img.manifest).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.x_cache(), "miss");
    assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.manifest.as_str())
    );
    assert_eq!(r.body, img.manifest_bytes);
    eventually("the manifest stored", || stowage.is_cached(&img.manifest)).await;

    let r = s.manifest(&img.manifest).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.x_cache(), "hit");
    assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.manifest.as_str())
    );
    assert_eq!(r.content_length(), Some(img.manifest_bytes.len() as u64));
    assert_eq!(sha256_digest(&r.body), img.manifest);

    let r = s
        .request(
            Method::HEAD,
            &s.manifest_path(&img.manifest),
            &[("accept", OCI_MANIFEST)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.x_cache(), "hit");
    assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(r.content_length(), Some(img.manifest_bytes.len() as u64));
    assert!(r.body.is_empty());

    assert_eq!(
        quay.requests().iter().filter(by_digest).count(),
        1,
        "{:#?}",
        quay.requests()
    );
}

/// Issue 15: a `HEAD` of a blob Stowage does not have, which upstream redirects to
/// storage, is answered `200` with the blob's length and digest: no `Location` for the
/// client to follow to a storage host it cannot reach through the proxy. Nothing is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_an_uncached_redirected_blob_is_answered_without_the_redirect() {
    let ca = TestCa::new();
    let storage = FakeStorage::start(&ca).await;
    let quay = FakeRegistry::builder(&ca)
        .host("quay.io")
        .storage(&storage)
        .blob_mode(BlobMode::Redirect(Location::Absolute))
        .build()
        .await;
    quay.redirect_heads();
    let data = pseudo_random(70_001, 15);
    let digest = quay.push_blob("team/app", data.clone());
    let stowage = Stowage::start(&ca).await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::Http11,
    )
    .await;
    let r = s.request(Method::HEAD, &s.blob_path(&digest), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.headers);
    assert_eq!(r.header("location"), None);
    assert_eq!(r.content_length(), Some(data.len() as u64));
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert!(r.body.is_empty());
    // Unknown upstream: its own answer, unchanged.
    let missing = sha256_digest(b"not there");
    let r = s.request(Method::HEAD, &s.blob_path(&missing), &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!stowage.is_cached(&digest), "a HEAD filled the cache");
}
