//! Self-checks of the test harness, without Stowage: the fakes must behave like the
//! registries they stand for, or a passing proxy test proves nothing.

mod common;

use common::*;
use http::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_registry_does_the_token_dance_and_counts() {
    let ca = TestCa::new();
    let hub = FakeRegistry::builder(&ca)
        .host("registry-1.docker.io")
        .realm_host("auth.docker.io")
        .build()
        .await;
    let img = hub.push_image(
        "library/app",
        "1.0",
        &[pseudo_random(10_000, 1), pseudo_random(20_000, 2)],
    );
    let client = ProxyClient::direct(&ca.cert_pem);

    let t = client
        .tunnel("registry-1.docker.io", hub.port(), Alpn::Http11)
        .await
        .unwrap();
    let ping = t.get("/v2/", &[]).await;
    assert_eq!(ping.status, StatusCode::UNAUTHORIZED);
    let challenge = ping.header("www-authenticate").unwrap();
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"https://auth.docker.io:{}/token\",service=\"fake\"",
            hub.port()
        )
    );

    // Without a token: 401 with the scope.
    let r = t
        .get(&format!("/v2/library/app/blobs/{}", img.config), &[])
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("scope=\"repository:library/app:pull\""));
    assert!(r.json()["errors"].is_array());

    let pulled = pull(
        &client,
        "registry-1.docker.io",
        hub.port(),
        "library/app",
        "1.0",
        Alpn::Both,
    )
    .await;
    assert_eq!(pulled.manifest_digest, img.manifest);
    assert_eq!(
        pulled.manifest.header("content-type"),
        Some(registry::OCI_MANIFEST)
    );
    assert_eq!(pulled.blobs.len(), 3);
    assert_eq!(pulled.blobs[0].1.body, img.config_bytes);
    // Counters count requests, whatever their answer: the refused one above too.
    assert_eq!(hub.blob_gets(), 4);
    assert_eq!(hub.manifest_gets(), 1);
    assert_eq!(hub.token_gets(), 1);
    // The token went to the auth host (same server, another name).
    let token_req = hub
        .requests()
        .into_iter()
        .find(|r| r.kind == Kind::Token)
        .unwrap();
    assert!(
        token_req.host.starts_with("auth.docker.io"),
        "{token_req:?}"
    );
    assert!(token_req.authorization.is_none());
    let blob_reqs: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.kind == Kind::Blob)
        .collect();
    assert_eq!(
        blob_reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [401, 200, 200, 200]
    );
    assert!(blob_reqs.iter().all(|r| r.by_client()));
    assert!(blob_reqs[1..].iter().all(|r| r.authorization.is_some()));

    // A token for one repository does not open another.
    hub.push_blob("library/other", pseudo_random(10, 3));
    let s = Session::login(
        &client,
        "registry-1.docker.io",
        hub.port(),
        "library/app",
        Alpn::H2,
    )
    .await;
    let r = s
        .get(
            &format!(
                "/v2/library/other/blobs/{}",
                sha256_digest(&pseudo_random(10, 3))
            ),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Unknown blob: 404.
    let r = s.blob(&sha256_digest(b"nope")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // HEAD: length, no body.
    let r = s
        .request(Method::HEAD, &s.blob_path(&img.layers[1]), &[])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_length(), Some(20_000));
    assert!(r.body.is_empty());
    assert_eq!(hub.blob_heads(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_registry_corrupts_redirects_and_holds() {
    let ca = TestCa::new();
    let storage = FakeStorage::start(&ca).await;
    let quay = FakeRegistry::builder(&ca)
        .host("quay.io")
        .storage(&storage)
        .build()
        .await;
    let data = pseudo_random(200_000, 7);
    let digest = quay.push_blob("team/app", data.clone());
    let client = ProxyClient::direct(&ca.cert_pem);
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;

    quay.corrupt_blob(&digest);
    let r = s.blob(&digest).await;
    assert_eq!(r.body.len(), data.len());
    assert_ne!(sha256_digest(&r.body), digest);
    quay.heal(&digest);
    assert_eq!(sha256_digest(&s.blob(&digest).await.body), digest);

    quay.set_blob_mode(BlobMode::Redirect(Location::Absolute));
    let r = s.blob(&digest).await;
    assert_eq!(r.status, StatusCode::TEMPORARY_REDIRECT);
    let loc = r.header("location").unwrap().to_owned();
    assert!(
        loc.starts_with(&format!(
            "https://storage.test:{}/blobs/{digest}?sig=",
            storage.port()
        )),
        "{loc}"
    );
    let st = client
        .tunnel("storage.test", storage.port(), Alpn::Both)
        .await
        .unwrap();
    let path = &loc[loc.find("/blobs/").unwrap()..];
    assert_eq!(
        sha256_digest(&st.get(path, &[("authorization", "Bearer x")]).await.body),
        digest
    );
    assert!(storage.saw_authorization());
    assert_eq!(
        st.get(&format!("/blobs/{digest}"), &[]).await.status,
        StatusCode::FORBIDDEN,
        "unsigned"
    );

    quay.set_blob_mode(BlobMode::Redirect(Location::PathRelative));
    let r = s.blob(&digest).await;
    let loc = r.header("location").unwrap().to_owned();
    assert!(loc.starts_with("/_storage/blobs/"), "{loc}");
    assert_eq!(sha256_digest(&s.tunnel.get(&loc, &[]).await.body), digest);
    assert_eq!(quay.storage_gets(), 1);
    quay.set_blob_mode(BlobMode::Redirect(Location::SchemeRelative));
    let loc = s.blob(&digest).await.header("location").unwrap().to_owned();
    assert!(
        loc.starts_with(&format!("//storage.test:{}/blobs/", storage.port())),
        "{loc}"
    );

    // A held body: the head and first chunk arrive, the rest only after the gate opens.
    quay.set_blob_mode(BlobMode::Serve);
    quay.set_chunking(1000, std::time::Duration::ZERO);
    let gate = quay.hold_blob_bodies();
    let t = client
        .tunnel("quay.io", quay.port(), Alpn::H2)
        .await
        .unwrap();
    let auth = format!("Bearer {}", s.token);
    let resp = t
        .send(
            Method::GET,
            &s.blob_path(&digest),
            &[("authorization", &auth)],
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let reader = tokio::spawn(client::read_response(resp));
    tokio::task::yield_now().await;
    assert!(!reader.is_finished());
    gate.open();
    let r = reader.await.unwrap();
    r.assert_complete();
    assert_eq!(sha256_digest(&r.body), digest);
}

#[test]
fn helpers() {
    assert_eq!(
        percent_decode("repository%3Aa%2Fb%3Apull"),
        "repository:a/b:pull"
    );
    assert_eq!(percent_decode("%zz%4"), "%zz%4");
    assert_eq!(
        percent_encode("repository:a/b:pull"),
        "repository%3Aa%2Fb%3Apull"
    );
    let r = pseudo_random(4096, 1);
    assert_ne!(r, pseudo_random(4096, 2));
    assert!(std::str::from_utf8(&r).is_err());
    let mut seen = [false; 256];
    r.iter().for_each(|b| seen[*b as usize] = true);
    assert!(seen.iter().all(|s| *s));
}
