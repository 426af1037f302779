//! Upgrading a cache written before registry identity included the port (issue 13).
//!
//! `tests/fixtures/cache-v1` was written by the previous release (commit b40c1ac) pulling
//! `registry.example.test:<some port>/org/app:1` (layers "old-format layer one" and
//! "... two"): a tag row and a public mark keyed `registry.example.test/org/app` without a
//! port, the manifest's media type, access times, and the four objects. Which port those
//! rows came from cannot be known, so the new release must open the cache, keep the
//! content, and never serve the old rows for any registry.

mod common;

use common::*;
use http::StatusCode;

const OLD_MANIFEST: &str =
    "sha256:bd4f2fc0714d704fb79fe14d52f8dc8dabb624fb98ea684a58e3ed58ad628746";
const OLD_LAYERS: [&[u8]; 2] = [b"old-format layer one", b"old-format layer two"];

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_without_ports_opens_keeps_its_content_and_never_serves_old_rows() {
    let ca = TestCa::new();
    let cache = tempfile::tempdir().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cache-v1");
    copy_dir(&fixture, cache.path());

    // The same name on a new port, where the tag now names different content.
    let reg = FakeRegistry::builder(&ca)
        .host("registry.example.test")
        .build()
        .await;
    let new = reg.push_image("org/app", "1", &[b"a new layer".to_vec()]);
    assert_ne!(new.manifest, OLD_MANIFEST);
    let s = Stowage::builder()
        .trust(&ca)
        .cache_dir(cache.path())
        .start()
        .await;
    assert!(
        s.is_cached(OLD_MANIFEST),
        "the old cache's content is kept on open"
    );
    let c = s.client();
    let pulled = pull(
        &c,
        "registry.example.test",
        reg.port(),
        "org/app",
        "1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(
        pulled.manifest_digest, new.manifest,
        "a port-less tag row from the old format was served"
    );
    assert_eq!(reg.manifest_gets(), 1, "the tag was asked upstream");

    // The old manifest by digest is not served on the strength of the old public mark:
    // this registry does not have it, and says so.
    let session = Session::login(
        &c,
        "registry.example.test",
        reg.port(),
        "org/app",
        Alpn::Http11,
    )
    .await;
    let r = session.manifest(OLD_MANIFEST).await;
    assert_ne!(
        r.status,
        StatusCode::OK,
        "old content served without upstream saying it belongs here"
    );

    // Where upstream does hold it, the kept content is served from the cache.
    reg.clear_requests();
    let old = reg.push_image("org/app", "old", &OLD_LAYERS.map(|l| l.to_vec()));
    assert_eq!(
        old.manifest, OLD_MANIFEST,
        "the fixture's image is rebuilt bit for bit"
    );
    let pulled = pull(
        &c,
        "registry.example.test",
        reg.port(),
        "org/app",
        "old",
        Alpn::Http11,
    )
    .await;
    assert_eq!(pulled.manifest_digest, OLD_MANIFEST);
    for (d, r) in &pulled.blobs {
        assert_eq!(
            r.x_cache(),
            "hit",
            "{d} was fetched again although it was cached"
        );
    }
    assert_eq!(reg.blob_gets(), 0, "kept blobs were downloaded again");
    s.stop().await.unwrap();
}
