//! Issue 3 end to end against the fake registry: who may read cached content, tag
//! manifests with a TTL and stale serving, upstream credentials, and what passes through
//! unchanged. Each test asserts on the fake's counters, the bytes (SHA-256) and the headers
//! the client got.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::registry::{DOCKER_MANIFEST, OCI_MANIFEST};
use common::*;
use http::{Method, StatusCode};

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A token for pulling `repo`, obtained through Stowage like a runtime does
/// (`/v2/` → 401 → realm), with `account` as HTTP Basic at the token service.
async fn login_as(
    client: &ProxyClient,
    host: &str,
    port: u16,
    repo: &str,
    account: Option<(&str, &str)>,
) -> Session {
    let tunnel = client
        .tunnel(host, port, Alpn::Http11)
        .await
        .unwrap_or_else(|e| panic!("tunnel to {host}: {e}"));
    let ping = tunnel.get("/v2/", &[]).await;
    assert_eq!(ping.status, StatusCode::UNAUTHORIZED, "{}", ping.text());
    let challenge = ping
        .header("www-authenticate")
        .expect("challenge")
        .to_owned();
    let realm = challenge
        .split("realm=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("realm")
        .to_owned();
    let realm: http::Uri = realm.parse().unwrap();
    assert_eq!(
        realm.host(),
        Some(host),
        "the fake's realm is on the registry host"
    );
    let path = format!(
        "{}?service=fake&scope={}",
        realm.path(),
        percent_encode(&format!("repository:{repo}:pull"))
    );
    let auth = account.map(|(u, p)| basic(u, p));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let resp = tunnel.get(&path, &headers).await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "token for {repo}: {}",
        resp.text()
    );
    let token = resp.json()["token"].as_str().expect("token").to_owned();
    Session {
        tunnel,
        token,
        repo: repo.to_owned(),
    }
}

/// Manifest by tag, config and layers with `s`; every status 200 and every body hashing
/// to its digest. Returns the X-Cache of each blob.
async fn pull_image(s: &Session, tag: &str, img: &Image) -> Vec<String> {
    let m = s.manifest(tag).await;
    assert_eq!(
        m.status,
        StatusCode::OK,
        "manifest {}:{tag}: {}",
        s.repo,
        m.text()
    );
    assert_eq!(sha256_digest(&m.body), img.manifest);
    let mut outcomes = Vec::new();
    for d in img.blobs() {
        let r = s.blob(&d).await;
        assert_eq!(r.status, StatusCode::OK, "blob {d}: {}", r.text());
        assert_eq!(sha256_digest(&r.body), d);
        outcomes.push(r.x_cache().to_owned());
    }
    outcomes
}

/// Requests Stowage made on behalf of the test client (it forwards our User-Agent).
fn by_client(reg: &FakeRegistry) -> Vec<Recorded> {
    reg.requests()
        .into_iter()
        .filter(|r| r.by_client())
        .collect()
}

/// Waits for Stowage's background anonymous probe of `repo` to end with `status`.
async fn probe_done(reg: &FakeRegistry, repo: &str, status: u16) {
    let prefix = format!("/v2/{repo}/");
    eventually(
        &format!("the anonymous probe of {repo} answered {status}"),
        || {
            reg.requests().iter().any(|r| {
                !r.by_client()
                    && r.method == Method::HEAD
                    && r.path.starts_with(&prefix)
                    && r.authorization.is_some()
                    && r.status == status
            })
        },
    )
    .await;
}

/// A refusal: upstream's status and challenge, never the content.
fn assert_refused(r: &Resp, content: &[u8], who: &str) {
    assert!(
        matches!(r.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
        "{who}: expected upstream's 401/403, got {} ({})",
        r.status,
        r.text()
    );
    if r.status == StatusCode::UNAUTHORIZED {
        let challenge = r
            .header("www-authenticate")
            .unwrap_or_else(|| panic!("{who}: 401 without WWW-Authenticate"));
        assert!(challenge.starts_with("Bearer realm="), "{who}: {challenge}");
    }
    assert!(
        r.body.len() < content.len()
            || sha256_digest(&r.body[..content.len()]) != sha256_digest(content),
        "{who}: got the content"
    );
    assert!(
        !r.body
            .windows(64.min(content.len()))
            .any(|w| w == &content[..64.min(content.len())]),
        "{who}: got content bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_is_served_only_to_clients_upstream_lets_read_it() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let layers = [pseudo_random(200_000, 31), pseudo_random(50_000, 32)];
    let img = quay.push_image("team/private", "v1", &layers);
    let other = quay.push_image("team/other", "v1", &[pseudo_random(1000, 33)]);
    quay.make_private("team/private");
    quay.make_private("team/other");
    quay.add_user("alice", "alice-pw", &["team/private"]);
    quay.add_user("carol", "carol-pw", &["team/other"]);
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let port = quay.port();

    // A pulls; everything is cached.
    let a = login_as(
        &client,
        "quay.io",
        port,
        "team/private",
        Some(("alice", "alice-pw")),
    )
    .await;
    assert_eq!(pull_image(&a, "v1", &img).await, ["miss", "miss", "miss"]);
    for d in img.blobs() {
        eventually("A's blobs stored", || stowage.is_cached(&d)).await;
    }
    assert_eq!(quay.blob_gets(), 3);
    // Stowage's anonymous probe learned that the repository is not public.
    probe_done(&quay, "team/private", 401).await;

    let layer = &layers[0];
    let layer_digest = &img.layers[0];
    let blob_path = format!("/v2/team/private/blobs/{layer_digest}");
    let manifest_by_tag = "/v2/team/private/manifests/v1".to_owned();
    let manifest_by_digest = format!("/v2/team/private/manifests/{}", img.manifest);

    // B: no credentials at all.
    let b = client.tunnel("quay.io", port, Alpn::H2).await.unwrap();
    assert_refused(&b.get(&blob_path, &[]).await, layer, "B blob");
    assert_refused(&b.head(&blob_path, &[]).await, layer, "B HEAD blob");
    assert_refused(
        &b.get(&manifest_by_tag, &[("accept", ACCEPT)]).await,
        &img.manifest_bytes,
        "B manifest by tag",
    );
    assert_refused(
        &b.get(&manifest_by_digest, &[("accept", ACCEPT)]).await,
        &img.manifest_bytes,
        "B manifest by digest",
    );
    let forged = b
        .get(&blob_path, &[("authorization", "Bearer forged")])
        .await;
    assert_refused(&forged, layer, "B with a forged token");

    // C: a valid account whose token covers another repository...
    let c = login_as(
        &client,
        "quay.io",
        port,
        "team/other",
        Some(("carol", "carol-pw")),
    )
    .await;
    assert_eq!(
        pull_image(&c, "v1", &other).await.len(),
        2,
        "C can read its own repository"
    );
    let downloads = quay.blob_gets();
    assert_eq!(downloads, 5);
    let c_auth = format!("Bearer {}", c.token);
    let r = c
        .tunnel
        .get(&blob_path, &[("authorization", &c_auth)])
        .await;
    assert_refused(&r, layer, "C blob");
    let r = c
        .tunnel
        .get(
            &manifest_by_tag,
            &[("authorization", &c_auth), ("accept", ACCEPT)],
        )
        .await;
    assert_refused(&r, &img.manifest_bytes, "C manifest");
    // ... and the same account asking for this repository (a token without access).
    let c2 = login_as(
        &client,
        "quay.io",
        port,
        "team/private",
        Some(("carol", "carol-pw")),
    )
    .await;
    assert_refused(
        &c2.blob(layer_digest).await,
        layer,
        "C with a team/private token",
    );
    // Stowage asked upstream with C's own credentials, and upstream said no.
    assert!(
        quay.requests().iter().any(|r| r.method == Method::HEAD
            && r.path == blob_path
            && r.authorization.as_deref() == Some(c_auth.as_str())
            && r.status == 401),
        "no upstream check with C's token: {:#?}",
        quay.requests()
    );
    assert_eq!(
        quay.blob_gets(),
        downloads,
        "a refusal downloaded something"
    );

    // A again: served from the cache, no new download, not even a check upstream.
    let seen = quay.requests().len();
    assert_eq!(pull_image(&a, "v1", &img).await, ["hit", "hit", "hit"]);
    let new: Vec<_> = quay.requests()[seen..]
        .iter()
        .filter(|r| r.by_client())
        .cloned()
        .collect();
    assert!(new.is_empty(), "A's second pull went upstream: {new:#?}");
    assert_eq!(quay.blob_gets(), downloads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_layer_being_downloaded_is_not_shared_with_an_unauthorized_client() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let layer = pseudo_random(1 << 20, 35);
    let digest = quay.push_blob("team/private", layer.clone());
    quay.make_private("team/private");
    quay.add_user("alice", "alice-pw", &["team/private"]);
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let a = login_as(
        &client,
        "quay.io",
        quay.port(),
        "team/private",
        Some(("alice", "alice-pw")),
    )
    .await;
    let a_auth = format!("Bearer {}", a.token);

    // A's download is in flight, held after its first chunk.
    let gate = quay.hold_blob_bodies();
    let path = format!("/v2/team/private/blobs/{digest}");
    let head = a
        .tunnel
        .send(Method::GET, &path, &[("authorization", &a_auth)])
        .await
        .expect("A's response head");
    assert_eq!(head.status(), StatusCode::OK);

    // B, without credentials, asks for the same blob meanwhile: refused, not joined.
    let b = client
        .tunnel("quay.io", quay.port(), Alpn::H2)
        .await
        .unwrap();
    let r = b.get(&path, &[]).await;
    assert_refused(&r, &layer, "B during A's download");
    assert_eq!(quay.blob_gets(), 1);

    gate.open();
    let got = client::read_response(head).await;
    got.assert_complete();
    assert_eq!(sha256_digest(&got.body), digest);
    eventually("the layer stored", || stowage.is_cached(&digest)).await;
    assert_refused(&b.get(&path, &[]).await, &layer, "B after A's download");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_private_manifest_goes_only_to_clients_upstream_let_read_it() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/private", "v1", &[pseudo_random(5_000, 36)]);
    quay.make_private("team/private");
    quay.add_user("alice", "alice-pw", &["team/private"]);
    let stowage = Stowage::builder()
        .trust(&ca)
        .cache("manifest_ttl = \"1ms\"")
        .start()
        .await;
    let client = stowage.client();
    let a = login_as(
        &client,
        "quay.io",
        quay.port(),
        "team/private",
        Some(("alice", "alice-pw")),
    )
    .await;
    assert_eq!(a.manifest("v1").await.body, img.manifest_bytes);
    probe_done(&quay, "team/private", 401).await;

    quay.fail_manifests(Some(StatusCode::TOO_MANY_REQUESTS));
    let (stale, _) = poll_manifest(&a, "v1", |m| m.x_cache() != "hit").await;
    assert_eq!(stale.x_cache(), "stale");
    assert_eq!(stale.body, img.manifest_bytes);

    // B has no credentials: upstream's 401 to its revalidation is all it gets (a complete
    // response, though upstream answered a HEAD), never the stored manifest.
    let b = client
        .tunnel("quay.io", quay.port(), Alpn::Http11)
        .await
        .unwrap();
    for _ in 0..3 {
        let r = b
            .get("/v2/team/private/manifests/v1", &[("accept", ACCEPT)])
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "B: {} {}",
            r.x_cache(),
            r.text()
        );
        assert!(
            r.header("www-authenticate")
                .is_some_and(|c| c.starts_with("Bearer realm=")),
            "{:?}",
            r.headers
        );
        assert_ne!(r.body, img.manifest_bytes);
        assert_eq!(r.json()["errors"][0]["code"], "UNAUTHORIZED");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_image_is_served_from_the_cache_with_upstream_down() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let public = quay.push_image("team/public", "v1", &[pseudo_random(120_000, 41)]);
    let private = quay.push_image("team/secret", "v1", &[pseudo_random(90_000, 42)]);
    quay.make_private("team/secret");
    quay.add_user("alice", "alice-pw", &["team/secret"]);
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let port = quay.port();

    let pulled = pull(&client, "quay.io", port, "team/public", "v1", Alpn::Http11).await;
    assert_eq!(pulled.manifest_digest, public.manifest);
    let a = login_as(
        &client,
        "quay.io",
        port,
        "team/secret",
        Some(("alice", "alice-pw")),
    )
    .await;
    pull_image(&a, "v1", &private).await;
    for d in public.blobs().iter().chain(private.blobs().iter()) {
        eventually("blobs stored", || stowage.is_cached(d)).await;
    }
    probe_done(&quay, "team/public", 200).await;
    probe_done(&quay, "team/secret", 401).await;
    drop(quay);

    // A new client without any credentials, upstream gone.
    let t = client.tunnel("quay.io", port, Alpn::H2).await.unwrap();
    let not_cached = t
        .get("/v2/team/public/manifests/v2", &[("accept", ACCEPT)])
        .await;
    assert!(
        not_cached.status.is_server_error(),
        "upstream is really down: {}",
        not_cached.status
    );
    // The probe's verdict is stored just after the fake answered it: allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = t
            .get("/v2/team/public/manifests/v1", &[("accept", ACCEPT)])
            .await;
        if m.status == StatusCode::OK || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        m.status,
        StatusCode::OK,
        "public manifest with upstream down: {}",
        m.text()
    );
    assert_eq!(m.x_cache(), "hit");
    assert_eq!(m.body, public.manifest_bytes);
    for d in public.blobs() {
        let r = t.get(&format!("/v2/team/public/blobs/{d}"), &[]).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "public blob with upstream down: {}",
            r.text()
        );
        assert_eq!(r.x_cache(), "hit");
        assert_eq!(sha256_digest(&r.body), d);
    }

    // Private content stays private when upstream cannot be asked.
    for d in private.blobs() {
        let r = t.get(&format!("/v2/team/secret/blobs/{d}"), &[]).await;
        assert!(
            !r.status.is_success(),
            "private blob served with upstream down"
        );
        assert_ne!(sha256_digest(&r.body), d);
    }
    let r = t
        .get("/v2/team/secret/manifests/v1", &[("accept", ACCEPT)])
        .await;
    assert!(
        !r.status.is_success(),
        "private manifest served with upstream down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_the_ttl_a_tag_is_answered_without_any_upstream_request() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(80_000, 51)]);
    let stowage = Stowage::start(&ca).await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::H2,
    )
    .await;

    assert_eq!(pull_image(&s, "v1", &img).await, ["miss", "miss"]);
    for d in img.blobs() {
        eventually("blobs stored", || stowage.is_cached(&d)).await;
    }
    probe_done(&quay, "team/app", 200).await;

    // The tag moves upstream; within the TTL Stowage does not ask.
    let moved = quay.push_image("team/app", "v1", &[pseudo_random(80_000, 52)]);
    let seen = quay.requests().len();
    for _ in 0..3 {
        let m = s.manifest("v1").await;
        assert_eq!(m.status, StatusCode::OK);
        assert_eq!(m.x_cache(), "hit");
        assert_eq!(
            m.body, img.manifest_bytes,
            "the cached manifest, not the moved tag"
        );
        let h = s
            .request(Method::HEAD, &s.manifest_path("v1"), &[("accept", ACCEPT)])
            .await;
        assert_eq!(h.x_cache(), "hit");
        assert_eq!(
            h.header("docker-content-digest"),
            Some(img.manifest.as_str())
        );
    }
    assert_eq!(pull_image(&s, "v1", &img).await, ["hit", "hit"]);
    let after: Vec<_> = quay.requests()[seen..].to_vec();
    assert!(
        after.is_empty(),
        "upstream was asked within the TTL: {after:#?}"
    );
    assert_ne!(moved.manifest, img.manifest);
}

/// Requests the tag every 50 ms until `done` holds for a response (at most 10 s).
async fn poll_manifest(
    s: &Session,
    tag: &str,
    mut done: impl FnMut(&Resp) -> bool,
) -> (Resp, Vec<Resp>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut before = Vec::new();
    loop {
        let m = s.manifest(tag).await;
        if done(&m) {
            return (m, before);
        }
        assert!(
            Instant::now() < deadline,
            "gave up polling {tag}; last: {} {:?} {}",
            m.status,
            m.headers,
            m.text()
        );
        before.push(m);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tag_is_picked_up_after_the_ttl() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(10_000, 61)]);
    let stowage = Stowage::builder()
        .trust(&ca)
        .cache("manifest_ttl = \"1s\"")
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
    let client_manifests = |m: Method| {
        by_client(&quay)
            .iter()
            .filter(|r| r.kind == Kind::Manifest && r.method == m)
            .count()
    };

    let started = Instant::now();
    let first = s.manifest("v1").await;
    assert_eq!(first.x_cache(), "miss");
    assert_eq!(first.body, img.manifest_bytes);

    // After the TTL, the same digest upstream: revalidated with HEAD, the stored body served.
    let (revalidated, earlier) =
        poll_manifest(&s, "v1", |_| client_manifests(Method::HEAD) > 0).await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "revalidated before the TTL was over"
    );
    assert!(earlier
        .iter()
        .all(|m| m.x_cache() == "hit" && m.body == img.manifest_bytes));
    assert_eq!(revalidated.status, StatusCode::OK);
    assert_eq!(revalidated.x_cache(), "hit");
    assert_eq!(revalidated.body, img.manifest_bytes);
    assert_eq!(
        client_manifests(Method::GET),
        1,
        "an unchanged tag was downloaded again"
    );

    // The tag moves: picked up on the first revalidation after the TTL.
    let moved = quay.push_image("team/app", "v1", &[pseudo_random(10_000, 62)]);
    let (new, earlier) = poll_manifest(&s, "v1", |m| m.body == moved.manifest_bytes).await;
    assert!(
        earlier.iter().all(|m| m.body == img.manifest_bytes),
        "something else was served meanwhile"
    );
    assert_eq!(new.status, StatusCode::OK);
    assert_eq!(new.x_cache(), "miss");
    assert_eq!(
        new.header("docker-content-digest"),
        Some(moved.manifest.as_str())
    );
    assert_eq!(client_manifests(Method::GET), 2);
    assert!(
        client_manifests(Method::HEAD) >= 2,
        "the move was found by HEAD revalidation"
    );
    // And the new manifest is now the cached one.
    let again = s.manifest("v1").await;
    assert_eq!(again.body, moved.manifest_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_rules_by_tag_pattern_override_the_default() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let latest = quay.push_image("team/app", "latest", &[pseudo_random(1_000, 141)]);
    let pinned = quay.push_image("team/app", "v1.2.3", &[pseudo_random(1_000, 142)]);
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml("[[cache.ttl]]\ntag = \"lat*\"\nttl = \"1ms\"\n")
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
    let heads_of = |tag: &str| {
        let path = format!("/v2/team/app/manifests/{tag}");
        by_client(&quay)
            .iter()
            .filter(|r| r.method == Method::HEAD && r.path == path)
            .count()
    };
    assert_eq!(s.manifest("latest").await.body, latest.manifest_bytes);
    assert_eq!(s.manifest("v1.2.3").await.body, pinned.manifest_bytes);

    let (r, _) = poll_manifest(&s, "latest", |_| heads_of("latest") > 0).await;
    assert_eq!(r.x_cache(), "hit", "revalidated and unchanged");
    for _ in 0..3 {
        assert_eq!(s.manifest("v1.2.3").await.x_cache(), "hit");
    }
    assert_eq!(
        heads_of("v1.2.3"),
        0,
        "a tag outside the rule was revalidated within the default 5m"
    );
    assert_eq!(quay.manifest_gets(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_server_errors_serve_the_stale_manifest_with_a_warning() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(10_000, 71)]);
    quay.push_image("team/app", "v2", &[pseudo_random(10_000, 72)]);
    let stowage = Stowage::builder()
        .trust(&ca)
        .cache("manifest_ttl = \"1ms\"")
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

    let first = s.manifest("v1").await;
    assert_eq!(first.x_cache(), "miss");
    assert_eq!(quay.manifest_gets(), 1);

    for status in [
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::INTERNAL_SERVER_ERROR,
    ] {
        quay.fail_manifests(Some(status));
        let heads_before = quay
            .requests()
            .iter()
            .filter(|r| {
                r.kind == Kind::Manifest && r.method == Method::HEAD && r.status == status.as_u16()
            })
            .count();
        let (stale, earlier) = poll_manifest(&s, "v1", |m| m.x_cache() != "hit").await;
        assert!(earlier.iter().all(|m| m.body == img.manifest_bytes));
        assert_eq!(stale.status, StatusCode::OK, "{status}: {}", stale.text());
        assert_eq!(stale.x_cache(), "stale", "{status}");
        let warning = stale
            .header("warning")
            .unwrap_or_else(|| panic!("{status}: no Warning header: {:?}", stale.headers));
        assert!(warning.starts_with("110 "), "{status}: {warning}");
        assert_eq!(stale.body, img.manifest_bytes, "{status}");
        assert_eq!(stale.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(
            stale.header("docker-content-digest"),
            Some(img.manifest.as_str())
        );
        let heads_after = quay
            .requests()
            .iter()
            .filter(|r| {
                r.kind == Kind::Manifest && r.method == Method::HEAD && r.status == status.as_u16()
            })
            .count();
        assert!(
            heads_after > heads_before,
            "{status}: the revalidation that failed was a HEAD"
        );
        // A tag never cached has nothing stale: upstream's answer reaches the client.
        let uncached = s.manifest("v2").await;
        assert_eq!(uncached.status, status, "{}", uncached.text());
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(uncached.header("retry-after"), Some("60"));
        }
    }
    assert_eq!(
        quay.manifest_gets(),
        4,
        "only the uncached tag was asked for with GET: {:#?}",
        quay.requests()
    );

    quay.fail_manifests(None);
    let (fresh, _) = poll_manifest(&s, "v1", |m| m.x_cache() == "hit").await;
    assert!(fresh.header("warning").is_none());
    assert_eq!(fresh.body, img.manifest_bytes);

    // Upstream unreachable: stale too.
    drop(quay);
    let (stale, _) = poll_manifest(&s, "v1", |m| m.x_cache() != "hit").await;
    assert_eq!(stale.status, StatusCode::OK, "{}", stale.text());
    assert_eq!(stale.x_cache(), "stale");
    assert!(
        stale
            .header("warning")
            .is_some_and(|w| w.starts_with("110 ")),
        "{:?}",
        stale.headers
    );
    assert_eq!(stale.body, img.manifest_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_serves_the_cache_without_asking_upstream() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image(
        "team/app",
        "v1",
        &[pseudo_random(150_000, 81), pseudo_random(3_000, 82)],
    );
    let cache = tempfile::tempdir().unwrap();
    // A TTL that is over at once: offline, the tag is served stale, never revalidated.
    let start = |offline: bool| {
        let b = Stowage::builder()
            .trust(&ca)
            .cache_dir(cache.path())
            .cache("manifest_ttl = \"1ms\"");
        if offline {
            b.cache("offline = true")
        } else {
            b
        }
        .start()
    };
    let online = start(false).await;
    let s = Session::login(
        &online.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::Http11,
    )
    .await;
    assert_eq!(pull_image(&s, "v1", &img).await, ["miss", "miss", "miss"]);
    for d in img.blobs() {
        eventually("blobs stored", || online.is_cached(&d)).await;
    }
    probe_done(&quay, "team/app", 200).await;
    let token = s.token.clone();
    online.stop().await.expect("online instance stops");
    // Upstream moves the tag: an offline Stowage never learns it.
    quay.push_image("team/app", "v1", &[pseudo_random(1_000, 83)]);

    let stowage = start(true).await;
    let client = stowage.client();
    let seen = quay.requests().len();
    // The client still holds the token it had (offline, `/v2/` answers 200 and no token
    // service is asked).
    let s = Session {
        tunnel: client
            .tunnel("quay.io", quay.port(), Alpn::Http11)
            .await
            .unwrap(),
        token,
        repo: "team/app".into(),
    };
    for _ in 0..2 {
        assert_eq!(pull_image(&s, "v1", &img).await, ["hit", "hit", "hit"]);
        let m = s.manifest("v1").await;
        assert_eq!(m.x_cache(), "stale");
        assert_eq!(
            m.header("warning"),
            Some(r#"110 stowage "Response is Stale""#)
        );
    }
    // A client without credentials gets the public repository too.
    let t = client
        .tunnel("quay.io", quay.port(), Alpn::H2)
        .await
        .unwrap();
    let m = t
        .get("/v2/team/app/manifests/v1", &[("accept", ACCEPT)])
        .await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.text());
    assert_eq!(m.body, img.manifest_bytes);
    // A miss is not fetched: upstream is not asked.
    let miss = t
        .get(
            &format!("/v2/team/app/blobs/{}", sha256_digest(b"not cached")),
            &[],
        )
        .await;
    assert_eq!(miss.status, StatusCode::BAD_GATEWAY, "{}", miss.text());
    let after: Vec<_> = quay.requests()[seen..].to_vec();
    assert!(
        after.is_empty(),
        "offline Stowage asked upstream: {after:#?}"
    );
}

/// Every tracing event written while it is the thread's default subscriber.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> LogBuffer {
        self.clone()
    }
}

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// A current-thread runtime: every task (Stowage, the fake, the client) runs on this thread,
// where the capturing subscriber is the default.
#[tokio::test(flavor = "current_thread")]
async fn configured_credentials_answer_for_anonymous_clients_and_stay_out_of_the_logs() {
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    const USER: &str = "robot";
    const PASSWORD: &str = "pw-Zq8x3VbN7s-never-logged";
    std::env::set_var("STOWAGE_TEST_AUTH_HUB_PASSWORD", PASSWORD);
    let ca = TestCa::new();
    let hub = FakeRegistry::builder(&ca)
        .host("registry-1.docker.io")
        .realm_host("auth.docker.io")
        .build()
        .await;
    let img = hub.push_image("acme/private", "v1", &[pseudo_random(60_000, 91)]);
    hub.make_private("acme/private");
    hub.add_user(USER, PASSWORD, &["acme/private"]);
    let stowage = Stowage::builder()
        .trust(&ca)
        // The account is for this registry only: host, and port (the fake's).
        .toml(&format!("[[registry]]\nhost = \"registry-1.docker.io:{}\"\nauth_hosts = [\"auth.docker.io:{}\"]\nusername = \"{USER}\"\npassword_env = \"STOWAGE_TEST_AUTH_HUB_PASSWORD\"\n", hub.port(), hub.port()))
        .start()
        .await;
    let client = stowage.client();
    let port = hub.port();
    let basic = basic(USER, PASSWORD);

    // An anonymous client: no token dance, no Authorization; Stowage answers for it.
    let t = client
        .tunnel("registry-1.docker.io", port, Alpn::Http11)
        .await
        .unwrap();
    let ping = t.get("/v2/", &[]).await;
    assert_eq!(
        ping.status,
        StatusCode::OK,
        "the /v2/ challenge answered with the account: {}",
        ping.text()
    );
    let m = t
        .get("/v2/acme/private/manifests/v1", &[("accept", ACCEPT)])
        .await;
    assert_eq!(
        m.status,
        StatusCode::OK,
        "private manifest for an anonymous client: {}",
        m.text()
    );
    assert_eq!(m.body, img.manifest_bytes);
    for d in img.blobs() {
        let r = t.get(&format!("/v2/acme/private/blobs/{d}"), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(sha256_digest(&r.body), d);
    }
    let tokens = hub.token_authorizations();
    assert!(
        !tokens.is_empty() && tokens.iter().all(|a| *a == basic),
        "the token service saw: {tokens:?}"
    );
    // Tokens are cached: more requests for the repository need no new one.
    let r = t
        .request(
            Method::HEAD,
            "/v2/acme/private/manifests/v1",
            &[("accept", OCI_MANIFEST)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t
        .get("/v2/acme/private/manifests/missing", &[("accept", ACCEPT)])
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    assert_eq!(
        hub.token_authorizations().len(),
        tokens.len(),
        "a cached token was fetched again"
    );
    // Once the repository has been challenged, Stowage sends the token up front: of all
    // the registry requests for it, only the first earned a 401.
    // (Stowage's own anonymous probe of the repository is not a client request.)
    let for_client: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.by_client() && r.path.starts_with("/v2/acme/private/"))
        .collect();
    let repo_401s = for_client.iter().filter(|r| r.status == 401).count();
    let repo_requests = for_client.len();
    assert!(
        repo_requests >= 4,
        "{repo_requests} registry requests for the repository"
    );
    let seen: Vec<_> = hub
        .requests()
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {}",
                r.method,
                r.path,
                r.status,
                r.authorization.is_some()
            )
        })
        .collect();
    assert_eq!(
        repo_401s, 1,
        "requests for an already challenged repository went out without their token: {seen:#?}"
    );
    let token_hosts: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.kind == Kind::Token)
        .map(|r| r.host)
        .collect();
    assert!(
        token_hosts.iter().all(|h| h.starts_with("auth.docker.io")),
        "{token_hosts:?}"
    );
    // The registry itself got Stowage's bearer tokens, never the password.
    for r in hub.requests().iter().filter(|r| r.kind != Kind::Token) {
        let a = r.authorization.as_deref().unwrap_or("");
        assert!(
            a.is_empty() || a.starts_with("Bearer "),
            "{} {} carried {a:?}",
            r.method,
            r.path
        );
        assert!(
            r.status != 200 || a.starts_with("Bearer "),
            "{} {} served without a token",
            r.method,
            r.path
        );
    }

    // A client's own token request to the auth host gets the account added.
    let auth = client
        .tunnel("auth.docker.io", port, Alpn::Http11)
        .await
        .unwrap();
    let before = hub.token_authorizations().len();
    let r = auth
        .get(
            "/token?service=fake&scope=repository%3Aacme%2Fprivate%3Apull",
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        &hub.token_authorizations()[before..],
        std::slice::from_ref(&basic),
        "credentials injected into the client's token request"
    );
    let token = r.json()["token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {token}");
    let blob = t
        .get(
            &format!("/v2/acme/private/blobs/{}", img.layers[0]),
            &[("authorization", &bearer)],
        )
        .await;
    assert_eq!(
        blob.status,
        StatusCode::OK,
        "the injected token reads the private repository"
    );

    // A client's own (bad) credentials win: Stowage does not swap in its account.
    let r = t
        .get(
            "/v2/acme/private/manifests/v1",
            &[("accept", ACCEPT), ("authorization", "Bearer not-a-token")],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert!(hub
        .requests()
        .iter()
        .any(|r| r.authorization.as_deref() == Some("Bearer not-a-token")));

    drop(t);
    drop(auth);
    stowage.stop().await.unwrap();
    let text = logs.text();
    assert!(
        text.contains("registry-1.docker.io") && text.lines().count() > 10,
        "the capture works: {text}"
    );
    let b64 = basic.trim_start_matches("Basic ");
    for (i, line) in text.lines().enumerate() {
        assert!(
            !line.contains(PASSWORD),
            "log line {i} carries the password: {line}"
        );
        assert!(
            !line.contains(b64),
            "log line {i} carries the Basic credentials: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_token_that_upstream_rejects_is_replaced() {
    std::env::set_var("STOWAGE_TEST_AUTH_RESTART_PASSWORD", "robot-pw");
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/private", "v1", &[pseudo_random(20_000, 151)]);
    let v2 = quay.push_image("team/private", "v2", &[pseudo_random(20_000, 152)]);
    quay.make_private("team/private");
    quay.add_user("robot", "robot-pw", &["team/private"]);
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&format!("[[registry]]\nhost = \"quay.io:{}\"\nusername = \"robot\"\npassword_env = \"STOWAGE_TEST_AUTH_RESTART_PASSWORD\"\n", quay.port()))
        .start()
        .await;
    let t = stowage
        .client()
        .tunnel("quay.io", quay.port(), Alpn::Http11)
        .await
        .unwrap();
    let m = t
        .get("/v2/team/private/manifests/v1", &[("accept", ACCEPT)])
        .await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.text());
    assert_eq!(m.body, img.manifest_bytes);
    let tokens = quay.token_authorizations().len();

    // Upstream restarts and no longer accepts the token Stowage cached.
    quay.forget_tokens();
    let m = t
        .get("/v2/team/private/manifests/v2", &[("accept", ACCEPT)])
        .await;
    assert_eq!(
        m.status,
        StatusCode::OK,
        "a stale cached token locked the account out: {}",
        m.text()
    );
    assert_eq!(m.body, v2.manifest_bytes);
    assert!(
        quay.token_authorizations().len() > tokens,
        "no new token was fetched"
    );
    let r = t
        .get(&format!("/v2/team/private/blobs/{}", v2.layers[0]), &[])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256_digest(&r.body), v2.layers[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_401_reaches_the_client_unchanged() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(5_000, 101)]);
    let stowage = Stowage::start(&ca).await;
    let direct = ProxyClient::direct(&ca.cert_pem)
        .tunnel("quay.io", quay.port(), Alpn::Http11)
        .await
        .unwrap();
    let t = stowage
        .client()
        .tunnel("quay.io", quay.port(), Alpn::Http11)
        .await
        .unwrap();

    for (path, auth) in [
        ("/v2/".to_owned(), None),
        ("/v2/team/app/manifests/v1".to_owned(), None),
        (format!("/v2/team/app/blobs/{}", img.layers[0]), None),
        (
            "/v2/team/app/manifests/v1".to_owned(),
            Some("Bearer expired"),
        ),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let want = direct.get(&path, &headers).await;
        let got = t.get(&path, &headers).await;
        assert_eq!(want.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            got.status,
            StatusCode::UNAUTHORIZED,
            "{path}: {}",
            got.text()
        );
        assert_eq!(
            got.header("www-authenticate"),
            want.header("www-authenticate"),
            "{path}"
        );
        assert_eq!(got.body, want.body, "{path}");
        assert_eq!(
            got.header("content-type"),
            want.header("content-type"),
            "{path}"
        );
    }
    assert!(stowage.cached_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_authorization_passes_unchanged() {
    std::env::set_var("STOWAGE_TEST_AUTH_OWN_PASSWORD", "robot-pw");
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(30_000, 111)]);
    quay.add_user("robot", "robot-pw", &[]);
    // Configured credentials too: the client's own must still win.
    let stowage = Stowage::builder()
        .trust(&ca)
        .toml(&format!("[[registry]]\nhost = \"quay.io:{}\"\nusername = \"robot\"\npassword_env = \"STOWAGE_TEST_AUTH_OWN_PASSWORD\"\n", quay.port()))
        .start()
        .await;
    let client = stowage.client();
    // The client's own token dance (its `/v2/` ping is answered by Stowage's account, so
    // straight to the token service, like a runtime that already knows the realm).
    let tunnel = client
        .tunnel("quay.io", quay.port(), Alpn::Http11)
        .await
        .unwrap();
    let r = tunnel
        .get(
            "/token?service=fake&scope=repository%3Ateam%2Fapp%3Apull",
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let s = Session {
        tunnel,
        token: r.json()["token"].as_str().unwrap().to_owned(),
        repo: "team/app".into(),
    };
    let bearer = format!("Bearer {}", s.token);
    let tokens_before = quay.token_authorizations();
    assert!(
        tokens_before.is_empty(),
        "the client's anonymous token request got the account: {tokens_before:?}"
    );

    pull_image(&s, "v1", &img).await;
    let seen: Vec<_> = by_client(&quay)
        .into_iter()
        .filter(|r| matches!(r.kind, Kind::Manifest | Kind::Blob))
        .collect();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    for r in &seen {
        assert_eq!(
            r.authorization.as_deref(),
            Some(bearer.as_str()),
            "{} {}",
            r.method,
            r.path
        );
    }
    assert!(
        quay.token_authorizations().is_empty(),
        "Stowage fetched a token of its own for a client with one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_from_the_client_stays_head_upstream() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(70_000, 121)]);
    let stowage = Stowage::start(&ca).await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::H2,
    )
    .await;
    let client_requests = |kind: Kind, m: Method| {
        by_client(&quay)
            .iter()
            .filter(|r| r.kind == kind && r.method == m)
            .count()
    };

    let h = s
        .request(Method::HEAD, &s.manifest_path("v1"), &[("accept", ACCEPT)])
        .await;
    assert_eq!(h.status, StatusCode::OK);
    assert!(h.body.is_empty());
    assert_eq!(
        h.header("docker-content-digest"),
        Some(img.manifest.as_str())
    );
    assert_eq!(h.header("content-type"), Some(OCI_MANIFEST));
    let h = s
        .request(
            Method::HEAD,
            &s.manifest_path(&img.manifest),
            &[("accept", ACCEPT)],
        )
        .await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.content_length(), Some(img.manifest_bytes.len() as u64));
    let h = s
        .request(Method::HEAD, &s.blob_path(&img.layers[0]), &[])
        .await;
    assert_eq!(h.status, StatusCode::OK);
    assert!(h.body.is_empty());
    assert_eq!(h.content_length(), Some(70_000));

    assert_eq!(client_requests(Kind::Manifest, Method::HEAD), 2);
    assert_eq!(client_requests(Kind::Blob, Method::HEAD), 1);
    assert_eq!(
        client_requests(Kind::Manifest, Method::GET),
        0,
        "a HEAD became a GET upstream: {:#?}",
        quay.requests()
    );
    assert_eq!(
        client_requests(Kind::Blob, Method::GET),
        0,
        "a HEAD became a GET upstream: {:#?}",
        quay.requests()
    );
    assert_eq!(quay.blob_gets(), 0);
    assert!(!stowage.is_cached(&img.layers[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_stored_byte_for_byte_with_upstreams_headers() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let layer = quay.push_blob("team/app", pseudo_random(4_000, 131));
    let config = quay.push_blob("team/app", b"{\"os\":\"linux\"}".to_vec());
    // Odd but valid JSON: key order, spacing, CRLF, escapes, a trailing newline. Any
    // re-serialisation would change the bytes and so the digest.
    let docker = format!(
        "{{\r\n  \"schemaVersion\":2 ,\"mediaType\" : \"{DOCKER_MANIFEST}\",\r\n\t\"config\": {{\"size\": 14, \"digest\": \"{config}\", \"mediaType\": \"application/vnd.docker.container.image.v1+json\"}},\n  \"layers\": [ {{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\"size\":4000,\"digest\":\"{layer}\"}} ],\n  \"annotations\": {{\"note\": \"caf\\u00e9 \\/ tab\\t\"}}   \n}}\n"
    );
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    let index =
        format!("{{\"schemaVersion\": 2, \"mediaType\": \"{INDEX}\", \"manifests\": []}}   ");
    let docker_digest = quay.push_manifest(
        "team/app",
        Some("docker"),
        docker.clone().into_bytes(),
        DOCKER_MANIFEST,
    );
    let index_digest =
        quay.push_manifest("team/app", Some("index"), index.clone().into_bytes(), INDEX);
    let stowage = Stowage::start(&ca).await;
    let s = Session::login(
        &stowage.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::Http11,
    )
    .await;
    let accept = format!("{ACCEPT}, {INDEX}");

    for (tag, bytes, digest, media_type) in [
        ("docker", docker.as_bytes(), &docker_digest, DOCKER_MANIFEST),
        ("index", index.as_bytes(), &index_digest, INDEX),
    ] {
        let by_tag = s.manifest_path(tag);
        let by_digest = s.manifest_path(digest);
        for (i, path) in [&by_tag, &by_tag, &by_digest].into_iter().enumerate() {
            let r = s.get(path, &[("accept", &accept)]).await;
            assert_eq!(r.status, StatusCode::OK, "{tag} #{i}: {}", r.text());
            assert_eq!(
                r.x_cache(),
                if i == 0 { "miss" } else { "hit" },
                "{tag} #{i}"
            );
            assert!(
                &r.body[..] == bytes,
                "{tag} #{i}: the bytes changed: {:?}",
                r.text()
            );
            assert_eq!(r.header("content-type"), Some(media_type), "{tag} #{i}");
            assert_eq!(
                r.header("docker-content-digest"),
                Some(digest.as_str()),
                "{tag} #{i}"
            );
            assert_eq!(r.content_length(), Some(bytes.len() as u64), "{tag} #{i}");
        }
        let h = s
            .request(Method::HEAD, &by_tag, &[("accept", &accept)])
            .await;
        assert_eq!(h.x_cache(), "hit");
        assert_eq!(h.header("content-type"), Some(media_type));
        assert_eq!(h.header("docker-content-digest"), Some(digest.as_str()));
        assert_eq!(h.content_length(), Some(bytes.len() as u64));
        assert_eq!(
            std::fs::read(stowage.blob_path(digest)).expect("stored"),
            bytes,
            "{tag}: stored bytes"
        );
    }
    let gets = quay
        .requests()
        .into_iter()
        .filter(|r| r.kind == Kind::Manifest && r.method == Method::GET)
        .count();
    assert_eq!(gets, 2, "one upstream GET per manifest");
}

/// Issue 14, item 1: a configured account goes only to its own registry (scheme, host and
/// port) and to realms on that registry's configured auth hosts, and only over TLS. An
/// upstream naming a realm elsewhere (the same host on another port, another registry's
/// host, a plain `http://` realm) gets an anonymous token request, never the account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_credentials_go_only_to_the_registrys_own_realms() {
    const USER: &str = "alice";
    const PASSWORD: &str = "pw-realm-thief-bait";
    std::env::set_var("STOWAGE_TEST_AUTH_REALM_PASSWORD", PASSWORD);
    let basic = basic(USER, PASSWORD);
    let ca = TestCa::new();
    // Who receives what at each would-be realm.
    let thief = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_port = plain.local_addr().unwrap().port();
    let cleartext = Arc::new(Mutex::new(Vec::<u8>::new()));
    let seen = cleartext.clone();
    let plain_task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = plain.accept().await {
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).await.unwrap_or(0);
            seen.lock().unwrap().extend_from_slice(&buf[..n]);
            let _ = s
                .write_all(b"HTTP/1.1 500 No\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    });
    // 1. quay.io: realm on the same host, another port.
    let quay = FakeRegistry::builder(&ca)
        .host("quay.io")
        .realm(&format!("https://quay.io:{}/token", thief.port()))
        .build()
        .await;
    // 2. registry-1.docker.io: realm on another registry's host (not an auth host of this one).
    let hub = FakeRegistry::builder(&ca)
        .host("registry-1.docker.io")
        .realm_host("ghcr.io")
        .build()
        .await;
    // 3. gcr.io: a plain-HTTP realm.
    let gcr = FakeRegistry::builder(&ca)
        .host("gcr.io")
        .realm(&format!("http://gcr.io:{plain_port}/token"))
        .build()
        .await;
    // 4. Control: ghcr.io with its realm on its configured auth host gets the account.
    let ghcr = FakeRegistry::builder(&ca)
        .host("ghcr.io")
        .realm_host("auth.docker.io")
        .build()
        .await;
    let mut images = Vec::new();
    for (i, reg) in [&quay, &hub, &gcr, &ghcr].into_iter().enumerate() {
        let img = reg.push_image(
            "acme/private",
            "v1",
            &[pseudo_random(5_000, 300 + i as u64)],
        );
        reg.make_private("acme/private");
        reg.add_user(USER, PASSWORD, &["acme/private"]);
        images.push(img);
    }
    let account = |host: &str, port: u16, extra: &str| {
        format!("[[registry]]\nhost = \"{host}:{port}\"\n{extra}username = \"{USER}\"\npassword_env = \"STOWAGE_TEST_AUTH_REALM_PASSWORD\"\n")
    };
    let toml = [
        account("quay.io", quay.port(), ""),
        account("registry-1.docker.io", hub.port(), ""),
        account("gcr.io", gcr.port(), ""),
        account(
            "ghcr.io",
            ghcr.port(),
            &format!("auth_hosts = [\"auth.docker.io:{}\"]\n", ghcr.port()),
        ),
    ]
    .join("\n");
    let stowage = Stowage::builder().trust(&ca).toml(&toml).start().await;
    let client = stowage.client();
    let mut violations = Vec::new();
    for (name, reg, img) in [
        ("quay.io", &quay, &images[0]),
        ("registry-1.docker.io", &hub, &images[1]),
        ("gcr.io", &gcr, &images[2]),
        ("ghcr.io", &ghcr, &images[3]),
    ] {
        let t = client.tunnel(name, reg.port(), Alpn::Http11).await.unwrap();
        let m = t
            .get("/v2/acme/private/manifests/v1", &[("accept", ACCEPT)])
            .await;
        let control = name == "ghcr.io";
        if control && (m.status != StatusCode::OK || m.body != img.manifest_bytes) {
            violations.push(format!(
                "{name}: the account's own auth host did not get it through: {} {}",
                m.status,
                m.text()
            ));
        }
        if !control && m.status == StatusCode::OK {
            violations.push(format!(
                "{name}: the private manifest was served, so the account reached the foreign realm"
            ));
        }
    }
    let stolen = |reg: &FakeRegistry| reg.token_authorizations().contains(&basic);
    if stolen(&thief) {
        violations.push("quay.io: a realm on another port got the account".into());
    }
    if stolen(&hub) {
        violations.push("registry-1.docker.io: a realm on ghcr.io got the account".into());
    }
    let text = String::from_utf8_lossy(&cleartext.lock().unwrap()).to_string();
    if text.contains(&basic["Basic ".len()..]) {
        violations.push("gcr.io: the account went in cleartext to a plain-HTTP realm".into());
    }
    if !stolen(&ghcr) {
        violations.push("ghcr.io: its configured auth host never saw the account".into());
    }
    plain_task.abort();
    assert!(violations.is_empty(), "{violations:#?}");
}
