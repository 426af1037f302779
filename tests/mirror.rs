//! Issue 4 end to end: the registry-mirror listener (`?ns=`, dockerd's Docker Hub mirror,
//! the `/v2/<registry>/...` prefix, mirror users), one cache shared with the forward proxy,
//! and the direct (SNI) listener with its loop detection. The fakes listen on
//! 127.0.0.1:0, so registries are named with their port (`ns=quay.io:<port>`), the way
//! containerd names a registry on a non-default port.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::registry::OCI_MANIFEST;
use common::*;
use http::header::{HOST, USER_AGENT};
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// One plain HTTP/1.1 request to a mirror listener, as dockerd or containerd sends it.
async fn http(addr: SocketAddr, method: Method, path: &str, headers: &[(&str, &str)]) -> Resp {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the mirror");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("http/1.1 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string())
        .header(USER_AGENT, TEST_USER_AGENT);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Empty::<Bytes>::new()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), send.send_request(req))
        .await
        .expect("timeout")
        .expect("mirror request");
    let r = client::read_response(resp).await;
    r.assert_complete();
    r
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    http(addr, Method::GET, path, headers).await
}

/// A pull through the mirror: `/v2/`, the manifest by tag, then every blob. `prefix` is
/// what goes between `/v2/` and the repository (`""` or `"quay.io:1234/"`), `query` what
/// follows each path (`""` or `"?ns=..."`). Returns the X-Cache of each blob.
async fn mirror_pull(
    addr: SocketAddr,
    prefix: &str,
    repo: &str,
    tag: &str,
    query: &str,
    img: &Image,
    auth: Option<&str>,
) -> Vec<String> {
    let mut headers = vec![("accept", ACCEPT)];
    if let Some(a) = auth {
        headers.push(("authorization", a));
    }
    let ping = get(addr, "/v2/", &headers).await;
    assert_eq!(
        ping.status,
        StatusCode::OK,
        "the mirror needs no upstream login: {}",
        ping.text()
    );
    let m = get(
        addr,
        &format!("/v2/{prefix}{repo}/manifests/{tag}{query}"),
        &headers,
    )
    .await;
    assert_eq!(
        m.status,
        StatusCode::OK,
        "manifest via the mirror: {}",
        m.text()
    );
    assert_eq!(m.body, img.manifest_bytes);
    assert_eq!(
        m.header("docker-content-digest"),
        Some(img.manifest.as_str())
    );
    assert_eq!(m.header("content-type"), Some(OCI_MANIFEST));
    let mut outcomes = Vec::new();
    for d in img.blobs() {
        let r = get(
            addr,
            &format!("/v2/{prefix}{repo}/blobs/{d}{query}"),
            &headers,
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "blob {d} via the mirror: {}",
            r.text()
        );
        assert_eq!(sha256_digest(&r.body), d);
        outcomes.push(r.x_cache().to_owned());
    }
    outcomes
}

/// Blob downloads upstream: `GET`s answered 200. (Stowage's own requests try without a
/// token first and answer the 401 challenge, so every blob also has a refused `GET`.)
fn downloads(reg: &FakeRegistry) -> usize {
    reg.requests()
        .iter()
        .filter(|r| r.kind == Kind::Blob && r.method == Method::GET && r.status == 200)
        .count()
}

/// Manifest `GET`s answered 200.
fn manifest_downloads(reg: &FakeRegistry) -> usize {
    reg.requests()
        .iter()
        .filter(|r| r.kind == Kind::Manifest && r.method == Method::GET && r.status == 200)
        .count()
}

fn mirror_config(extra: &str) -> String {
    format!("[mirror]\nlisten = \"127.0.0.1:0\"\n{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_ns_requests_are_served_and_then_come_from_the_cache() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image(
        "team/app",
        "v1",
        &[pseudo_random(300_000, 201), pseudo_random(40_000, 202)],
    );
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(""))
        .start()
        .await;
    let mirror = stowage.mirror_addr.expect("mirror listener");
    let ns = format!("?ns=quay.io:{}", quay.port());

    assert_eq!(
        mirror_pull(mirror, "", "team/app", "v1", &ns, &img, None).await,
        ["miss", "miss", "miss"]
    );
    assert_eq!(downloads(&quay), 3);
    for d in img.blobs() {
        eventually("blobs stored", || stowage.is_cached(&d)).await;
    }
    // Upstream saw the registry API without `ns`, with a token Stowage got anonymously.
    for r in quay
        .requests()
        .iter()
        .filter(|r| r.by_client() && r.status == 200)
    {
        assert!(r.query.is_none(), "ns went upstream: {r:?}");
        assert!(r.host.starts_with("quay.io"), "{r:?}");
        assert!(
            r.authorization
                .as_deref()
                .is_some_and(|a| a.starts_with("Bearer ")),
            "{r:?}"
        );
    }
    assert!(quay.token_gets() >= 1);

    let blob_gets = quay.blob_gets();
    assert_eq!(
        mirror_pull(mirror, "", "team/app", "v1", &ns, &img, None).await,
        ["hit", "hit", "hit"]
    );
    assert_eq!(
        quay.blob_gets(),
        blob_gets,
        "the second pull sent blob GETs upstream: {:#?}",
        quay.requests()
    );
    assert_eq!(downloads(&quay), 3);
    assert_eq!(manifest_downloads(&quay), 1, "the tag is within its TTL");
}

/// A pull the way containerd does it: `HEAD` of the tag to resolve its digest, then the
/// manifest by digest, then the blobs. Returns the X-Cache of the tag's `HEAD`.
async fn containerd_pull(addr: SocketAddr, repo: &str, tag: &str, ns: &str, img: &Image) -> String {
    let accept = format!("{ACCEPT}, application/vnd.oci.image.index.v1+json");
    let h = http(
        addr,
        Method::HEAD,
        &format!("/v2/{repo}/manifests/{tag}{ns}"),
        &[("accept", &accept)],
    )
    .await;
    assert_eq!(h.status, StatusCode::OK, "HEAD {repo}:{tag}");
    assert_eq!(
        h.header("docker-content-digest"),
        Some(img.manifest.as_str())
    );
    let m = get(
        addr,
        &format!("/v2/{repo}/manifests/{}{ns}", img.manifest),
        &[("accept", &accept)],
    )
    .await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.text());
    assert_eq!(m.body, img.manifest_bytes);
    for d in img.blobs() {
        let r = get(addr, &format!("/v2/{repo}/blobs/{d}{ns}"), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(sha256_digest(&r.body), d);
    }
    h.x_cache().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containerd_pull_resolving_the_tag_with_head_is_cached_too() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(64_000, 291)]);
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(""))
        .start()
        .await;
    let mirror = stowage.mirror_addr.unwrap();
    let ns = format!("?ns=quay.io:{}", quay.port());

    assert_eq!(
        containerd_pull(mirror, "team/app", "v1", &ns, &img).await,
        "miss"
    );
    for d in img.blobs() {
        eventually("blobs stored", || stowage.is_cached(&d)).await;
    }
    eventually("the anonymous probe", || {
        quay.requests()
            .iter()
            .any(|r| !r.by_client() && r.kind == Kind::Manifest && r.status == 200)
    })
    .await;
    assert_eq!(
        quay.manifest_heads(),
        quay.requests()
            .iter()
            .filter(|r| r.kind == Kind::Manifest && r.method == Method::HEAD)
            .count()
    );

    // The second pull, within the tag's TTL, does not ask upstream at all.
    let seen = quay.requests().len();
    assert_eq!(
        containerd_pull(mirror, "team/app", "v1", &ns, &img).await,
        "hit"
    );
    let asked: Vec<_> = quay.requests()[seen..].to_vec();
    assert!(
        asked.is_empty(),
        "the second pull went upstream: {asked:#?}"
    );

    // Nor does it need to: with upstream gone the image still pulls.
    drop(quay);
    assert_eq!(
        containerd_pull(mirror, "team/app", "v1", &ns, &img).await,
        "hit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_requests_without_ns_reach_docker_hub() {
    let ca = TestCa::new();
    let hub = FakeRegistry::builder(&ca)
        .host("registry-1.docker.io")
        .realm_host("auth.docker.io")
        .build()
        .await;
    let img = hub.push_image("library/alpine", "3.19", &[pseudo_random(90_000, 211)]);
    let org = hub.push_image("someorg/tool", "1", &[pseudo_random(9_000, 212)]);
    // registry-1.docker.io is pinned to 127.0.0.1 by the fixture's [upstream.resolve];
    // the default registry names the fake's port.
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(&format!(
            "default_registry = \"registry-1.docker.io:{}\"\n",
            hub.port()
        )))
        .start()
        .await;
    let mirror = stowage.mirror_addr.unwrap();

    // dockerd always sends official images as `library/<name>`; the path goes upstream as is.
    assert_eq!(
        mirror_pull(mirror, "", "library/alpine", "3.19", "", &img, None).await,
        ["miss", "miss"]
    );
    assert_eq!(
        mirror_pull(mirror, "", "someorg/tool", "1", "", &org, None).await,
        ["miss", "miss"]
    );
    let served: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.by_client() && r.kind == Kind::Manifest && r.status == 200)
        .collect();
    assert_eq!(served.len(), 2, "{served:#?}");
    assert_eq!(served[0].path, "/v2/library/alpine/manifests/3.19");
    assert!(
        served[0].host.starts_with("registry-1.docker.io"),
        "{:?}",
        served[0]
    );
    assert_eq!(served[1].path, "/v2/someorg/tool/manifests/1");
    for d in img.blobs() {
        eventually("blobs stored", || stowage.is_cached(&d)).await;
    }
    let tokens: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.kind == Kind::Token)
        .collect();
    assert!(
        !tokens.is_empty() && tokens.iter().all(|t| t.host.starts_with("auth.docker.io")),
        "{tokens:#?}"
    );

    // containerd's name for the same registry is `docker.io`: the same cache entries.
    let ns = format!("?ns=docker.io:{}", hub.port());
    assert_eq!(
        mirror_pull(mirror, "", "library/alpine", "3.19", &ns, &img, None).await,
        ["hit", "hit"]
    );
    assert_eq!(downloads(&hub), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_path_prefix_names_the_registry() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(50_000, 221)]);
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(""))
        .start()
        .await;
    let mirror = stowage.mirror_addr.unwrap();
    let prefix = format!("quay.io:{}/", quay.port());

    assert_eq!(
        mirror_pull(mirror, &prefix, "team/app", "v1", "", &img, None).await,
        ["miss", "miss"]
    );
    let paths: Vec<_> = quay
        .requests()
        .into_iter()
        .filter(|r| r.by_client() && r.status == 200)
        .map(|r| r.path)
        .collect();
    assert!(
        paths.contains(&"/v2/team/app/manifests/v1".to_owned()),
        "the prefix was stripped: {paths:?}"
    );
    assert!(paths.iter().all(|p| !p.contains("quay.io")), "{paths:?}");
    for d in img.blobs() {
        eventually("blobs stored", || stowage.is_cached(&d)).await;
    }
    assert_eq!(
        mirror_pull(mirror, &prefix, "team/app", "v1", "", &img, None).await,
        ["hit", "hit"]
    );
    assert_eq!(downloads(&quay), 2);

    let r = get(mirror, "/v2/unknown.example/team/app/manifests/v1", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["errors"][0]["code"], "NAME_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ns_is_refused_unless_any_registry_is_set() {
    let ca = TestCa::new();
    // tunnel.test resolves to the fakes but is no configured registry.
    let other = FakeRegistry::builder(&ca).host("tunnel.test").build().await;
    let img = other.push_image("team/app", "v1", &[pseudo_random(20_000, 231)]);
    let ns = format!("?ns=tunnel.test:{}", other.port());

    let strict = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(""))
        .start()
        .await;
    let mirror = strict.mirror_addr.unwrap();
    for path in [
        format!("/v2/team/app/manifests/v1{ns}"),
        format!("/v2/team/app/blobs/{}{ns}", img.layers[0]),
        format!("/v2/tunnel.test:{}/team/app/manifests/v1", other.port()),
    ] {
        let r = get(mirror, &path, &[("accept", ACCEPT)]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.text());
        let e = &r.json()["errors"][0];
        assert_eq!(e["code"], "NAME_UNKNOWN");
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains("tunnel.test") && message.contains("any_registry"),
            "not a clear error: {message}"
        );
    }
    let r = get(mirror, "/v2/team/app/manifests/v1?ns=..%2Fetc", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(
        other.requests().is_empty(),
        "an unknown registry was contacted: {:#?}",
        other.requests()
    );

    let open = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config("any_registry = true\n"))
        .start()
        .await;
    let mirror = open.mirror_addr.unwrap();
    assert_eq!(
        mirror_pull(mirror, "", "team/app", "v1", &ns, &img, None).await,
        ["miss", "miss"]
    );
    assert_eq!(downloads(&other), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_users_are_checked_and_never_sent_upstream() {
    std::env::set_var("STOWAGE_TEST_MIRROR_USER_PASSWORD", "ci-pw-4711");
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(30_000, 241)]);
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config("\n[[mirror.user]]\nusername = \"ci\"\npassword_env = \"STOWAGE_TEST_MIRROR_USER_PASSWORD\"\n"))
        .start()
        .await;
    let mirror = stowage.mirror_addr.unwrap();
    let ns = format!("?ns=quay.io:{}", quay.port());
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let good = format!("Basic {}", b64("ci:ci-pw-4711"));
    let wrong = format!("Basic {}", b64("ci:guess"));
    let stranger = format!("Basic {}", b64("eve:ci-pw-4711"));

    for auth in [
        None,
        Some(wrong.as_str()),
        Some(stranger.as_str()),
        Some("Bearer ci-pw-4711"),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        for path in [
            "/v2/".to_owned(),
            format!("/v2/team/app/manifests/v1{ns}"),
            format!("/v2/team/app/blobs/{}{ns}", img.layers[0]),
        ] {
            let r = get(mirror, &path, &headers).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{auth:?} {path}: {}",
                r.text()
            );
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|c| c.starts_with("Basic ")),
                "{:?}",
                r.headers
            );
            assert_eq!(r.json()["errors"][0]["code"], "UNAUTHORIZED");
        }
    }
    assert!(
        quay.requests().is_empty(),
        "unauthenticated mirror requests went upstream: {:#?}",
        quay.requests()
    );

    assert_eq!(
        mirror_pull(mirror, "", "team/app", "v1", &ns, &img, Some(&good)).await,
        ["miss", "miss"]
    );
    assert!(
        quay.requests()
            .iter()
            .all(|r| r.authorization.as_deref() != Some(good.as_str())),
        "the mirror's credentials went upstream"
    );
    for d in img.blobs() {
        eventually("blobs stored", || stowage.is_cached(&d)).await;
    }
    assert_eq!(
        mirror_pull(mirror, "", "team/app", "v1", &ns, &img, Some(&good)).await,
        ["hit", "hit"]
    );
    // Cached content is still behind the mirror's login.
    let r = get(
        mirror,
        &format!("/v2/team/app/blobs/{}{ns}", img.layers[0]),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_answers_upstream_challenges_with_the_configured_account() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/private", "v1", &[pseudo_random(25_000, 281)]);
    quay.make_private("team/private");
    quay.add_user("robot", "robot-pw-from-a-file", &["team/private"]);
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("quay-password");
    std::fs::write(&password_file, "robot-pw-from-a-file\n").unwrap();
    let ns = format!("?ns=quay.io:{}", quay.port());

    // Without an account the mirror pulls anonymously, and upstream refuses.
    let anonymous = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(""))
        .start()
        .await;
    let r = get(
        anonymous.mirror_addr.unwrap(),
        &format!("/v2/team/private/manifests/v1{ns}"),
        &[("accept", ACCEPT)],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert!(quay.token_authorizations().is_empty());

    let with_account = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(""))
        .toml(&format!(
            "[[registry]]\nhost = \"quay.io:{}\"\nusername = \"robot\"\npassword_file = {:?}\n",
            quay.port(),
            password_file.to_str().unwrap()
        ))
        .start()
        .await;
    let mirror = with_account.mirror_addr.unwrap();
    assert_eq!(
        mirror_pull(mirror, "", "team/private", "v1", &ns, &img, None).await,
        ["miss", "miss"]
    );
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("robot:robot-pw-from-a-file")
    );
    let tokens = quay.token_authorizations();
    assert!(
        !tokens.is_empty() && tokens.iter().all(|a| *a == basic),
        "{tokens:?}"
    );
    for d in img.blobs() {
        eventually("blobs stored", || with_account.is_cached(&d)).await;
    }
    assert_eq!(
        mirror_pull(mirror, "", "team/private", "v1", &ns, &img, None).await,
        ["hit", "hit"]
    );
    assert_eq!(downloads(&quay), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cache_across_mirror_and_proxy_modes() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image(
        "team/app",
        "v1",
        &[pseudo_random(400_000, 251), pseudo_random(10_000, 252)],
    );
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(""))
        .start()
        .await;
    let ns = format!("?ns=quay.io:{}", quay.port());

    assert_eq!(
        mirror_pull(
            stowage.mirror_addr.unwrap(),
            "",
            "team/app",
            "v1",
            &ns,
            &img,
            None
        )
        .await,
        ["miss", "miss", "miss"]
    );
    for d in img.blobs() {
        eventually("blobs stored", || stowage.is_cached(&d)).await;
    }
    let (manifests, blobs) = (manifest_downloads(&quay), quay.blob_gets());
    assert_eq!(downloads(&quay), 3);

    // The same image through HTTPS_PROXY (CONNECT): every blob a hit.
    let pulled = pull(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::H2,
    )
    .await;
    assert_eq!(pulled.manifest_digest, img.manifest);
    assert_eq!(pulled.manifest.x_cache(), "hit");
    assert_eq!(pulled.blob_x_cache(), ["hit", "hit", "hit"]);
    assert_eq!(
        quay.blob_gets(),
        blobs,
        "the proxy pull sent blob GETs upstream: {:#?}",
        quay.requests()
    );
    assert_eq!(manifest_downloads(&quay), manifests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_speaks_tls_with_a_leaf_from_the_ca() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(60_000, 271)]);
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(
            "tls = \"ca\"\nhostname = \"mirror.example.test\"\n",
        ))
        .start()
        .await;
    let port = stowage.mirror_addr.unwrap().port();
    let chain = handshake(
        stowage.mirror_addr.unwrap(),
        Some("mirror.example.test"),
        &stowage.ca_pem,
    )
    .await
    .expect("mirror TLS");
    assert_eq!(cert_names(&chain[0]).0, ["mirror.example.test"]);

    let ns = format!("?ns=quay.io:{}", quay.port());
    for alpn in [Alpn::H2, Alpn::Http11] {
        let t = ProxyClient::direct(&stowage.ca_pem)
            .tunnel("mirror.example.test", port, alpn)
            .await
            .expect("mirror TLS");
        assert_eq!(t.get("/v2/", &[]).await.status, StatusCode::OK);
        let m = t
            .get(
                &format!("/v2/team/app/manifests/v1{ns}"),
                &[("accept", ACCEPT)],
            )
            .await;
        assert_eq!(m.status, StatusCode::OK, "{alpn:?}: {}", m.text());
        assert_eq!(m.body, img.manifest_bytes);
        let h = t
            .head(&format!("/v2/team/app/blobs/{}{ns}", img.layers[0]), &[])
            .await;
        assert_eq!(h.status, StatusCode::OK, "{alpn:?}");
        assert_eq!(h.content_length(), Some(60_000));
        let missing = t
            .head(
                &format!("/v2/team/app/blobs/{}{ns}", sha256_digest(b"absent")),
                &[],
            )
            .await;
        assert_eq!(
            missing.status,
            StatusCode::NOT_FOUND,
            "{alpn:?}: a HEAD error arrives intact"
        );
        // The mirror's own errors to HEAD carry no body (over h2 one would be a stream error).
        let unknown = t
            .head("/v2/team/app/manifests/v1?ns=unknown.example", &[])
            .await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{alpn:?}");
        assert!(unknown.body.is_empty());
        for d in img.blobs() {
            let r = t.get(&format!("/v2/team/app/blobs/{d}{ns}"), &[]).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(sha256_digest(&r.body), d);
            eventually("blob stored", || stowage.is_cached(&d)).await;
        }
    }
    assert_eq!(
        downloads(&quay),
        2,
        "the second round came from the cache: {:#?}",
        quay.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_mints_leaves_only_for_its_own_names() {
    let ca = TestCa::new();
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(
            "tls = \"ca\"\nhostname = \"mirror.example.test\"\n",
        ))
        .start()
        .await;
    let mirror = stowage.mirror_addr.unwrap();
    // Its own name's leaf is minted at start, before any client waits for it.
    let proxy = ProxyClient::via_proxy(stowage.addr, &stowage.ca_pem);
    let text = proxy.proxy_get("/metrics").await.text();
    assert_eq!(
        metric(&text, "stowage_certificates_minted_total", &[]),
        1.0,
        "{text}"
    );
    // Any other name is refused with unrecognized_name: a leaf for it would let whoever
    // reaches the mirror impersonate that site to every client that trusts the CA.
    for sni in [
        "accounts.google.com",
        "evil.example",
        "mirror.example.test.evil",
    ] {
        match handshake(mirror, Some(sni), &stowage.ca_pem).await {
            Ok(chain) => panic!(
                "the mirror minted a valid leaf for SNI {sni}: {:?}",
                cert_names(&chain[0]).0
            ),
            Err(e) => assert!(e.contains("UnrecognisedName"), "SNI {sni}: {e}"),
        }
    }
    // Its own name and a configured registry.
    for sni in ["mirror.example.test", "registry.example.test"] {
        let chain = handshake(mirror, Some(sni), &stowage.ca_pem)
            .await
            .unwrap_or_else(|e| panic!("SNI {sni}: {e}"));
        assert_eq!(cert_names(&chain[0]).0, [sni]);
    }
}

/// A client that reaches the TLS mirror by IP (a `registry-mirrors` entry of
/// `https://10.0.0.5:5000`) sends no SNI: it must get a leaf for the address it connected
/// to, which it verifies as an IP SAN, not one for `hostname`, which it would refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_reached_by_ip_gets_a_leaf_for_that_ip() {
    let ca = TestCa::new();
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(
            "tls = \"ca\"\nhostname = \"mirror.example.test\"\n",
        ))
        .start()
        .await;
    let mirror = stowage.mirror_addr.unwrap();
    let chain = handshake(mirror, None, &stowage.ca_pem)
        .await
        .unwrap_or_else(|e| panic!("a client connecting by IP was refused: {e}"));
    // rustls checked the leaf against the IP; it names only that address, not `hostname`.
    let names = cert_names(&chain[0]).0;
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("IPAddress"), "{names:?}");
}

/// A server config check: a TLS handshake to `addr` presenting `sni` (`None`: no SNI, as
/// when connecting by IP), trusting only `ca_pem`.
async fn handshake(
    addr: SocketAddr,
    sni: Option<&str>,
    ca_pem: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let config = client_config(ca_pem);
    let name = match sni {
        Some(h) => rustls::pki_types::ServerName::try_from(h.to_owned()).unwrap(),
        // An IP address as the server name: rustls sends no SNI for it.
        None => rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    Ok(tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or(&[])
        .iter()
        .map(|c| c.clone().into_owned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_serves_the_registry_named_by_sni() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(200_000, 261)]);
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&format!(
            "[direct]\nlisten = \"127.0.0.1:0\"\nupstream_port = {}\n",
            quay.port()
        ))
        .start()
        .await;
    let direct = stowage.direct_addr.expect("direct listener");

    // SNI quay.io: a leaf for quay.io from Stowage's CA.
    let chain = handshake(direct, Some("quay.io"), &stowage.ca_pem)
        .await
        .expect("handshake with SNI quay.io");
    assert_eq!(cert_names(&chain[0]).0, ["quay.io"]);
    let chain = handshake(direct, Some("ghcr.io"), &stowage.ca_pem)
        .await
        .expect("handshake with SNI ghcr.io");
    assert_eq!(cert_names(&chain[0]).0, ["ghcr.io"]);
    // No SNI, or a name that is no registry: the handshake fails with an alert that says
    // why (unrecognized_name), not an unexpected end of stream.
    let e = handshake(direct, None, &stowage.ca_pem)
        .await
        .expect_err("a handshake without SNI succeeded");
    assert!(e.contains("UnrecognisedName"), "{e}");
    let e = handshake(direct, Some("not-a-registry.example"), &stowage.ca_pem)
        .await
        .expect_err("a handshake for a non-registry succeeded");
    assert!(e.contains("UnrecognisedName"), "{e}");

    // A client that reaches quay.io at Stowage's address (as /etc/hosts would send it)
    // pulls through it; the token service named by the realm is the fake's own port, so
    // this client also trusts the upstream test CA for that one request.
    let client = ProxyClient::direct(&format!("{}{}", stowage.ca_pem, ca.cert_pem));
    let first = pull(
        &client,
        "quay.io",
        direct.port(),
        "team/app",
        "v1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(first.manifest_digest, img.manifest);
    assert_eq!(first.blob_x_cache(), ["miss", "miss"], "served by Stowage");
    for d in img.blobs() {
        eventually("blobs stored", || stowage.is_cached(&d)).await;
    }
    let second = pull(
        &client,
        "quay.io",
        direct.port(),
        "team/app",
        "v1",
        Alpn::H2,
    )
    .await;
    assert_eq!(second.blob_x_cache(), ["hit", "hit"]);
    assert_eq!(downloads(&quay), 2);
    // The registry connection itself validates against Stowage's CA alone.
    let t = ProxyClient::direct(&stowage.ca_pem)
        .tunnel("quay.io", direct.port(), Alpn::Http11)
        .await
        .expect("Stowage's leaf");
    assert_eq!(
        t.get("/v2/", &[]).await.status,
        StatusCode::UNAUTHORIZED,
        "upstream's challenge passes through"
    );
}

/// A port that was free a moment ago, for a listener whose own port must be in its config.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_would_loop_back_to_stowage_get_a_508() {
    let ca = TestCa::new();
    // Direct mode whose upstream port is its own: quay.io resolves to 127.0.0.1, i.e. here.
    let port = free_port();
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&mirror_config(""))
        .toml(&format!(
            "[direct]\nlisten = \"127.0.0.1:{port}\"\nupstream_port = {port}\n"
        ))
        .start()
        .await;
    let t = ProxyClient::direct(&stowage.ca_pem)
        .tunnel("quay.io", port, Alpn::Http11)
        .await
        .expect("direct TLS");
    for path in [
        "/v2/".to_owned(),
        "/v2/team/app/manifests/v1".to_owned(),
        format!("/v2/team/app/blobs/{}", sha256_digest(b"x")),
    ] {
        let r = t.get(&path, &[]).await;
        assert_eq!(r.status, StatusCode::LOOP_DETECTED, "{path}: {}", r.text());
        let message = r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.contains("quay.io") && message.contains("resolves to this Stowage"),
            "{message}"
        );
    }

    // The mirror asked for a registry that is Stowage itself (its mirror or proxy port).
    let mirror = stowage.mirror_addr.unwrap();
    for own in [mirror.port(), stowage.addr.port()] {
        let r = get(
            mirror,
            &format!("/v2/team/app/manifests/v1?ns=quay.io:{own}"),
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::LOOP_DETECTED, "{}", r.text());
        assert!(r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("resolves to this Stowage"));
    }
}
