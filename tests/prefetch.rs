//! `stowage prefetch` and `[prefetch] images` (issue 17): the real CLI against an
//! in-process server and fake registry, counting what reached upstream.
//!
//! - an index with two platforms: `--platform` fetches only that platform's blobs;
//!   `--all-platforms` the rest, without fetching the first again;
//! - a missing REF and a denied repository exit non-zero naming each REF and why; `--file`;
//! - `--creds-env` for a private repository, and what it fetched is not served to an
//!   anonymous client;
//! - a prefetch and a client pulling the same blob meanwhile make one upstream GET;
//! - the warm list runs at start-up and again on its interval.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use common::registry::OCI_MANIFEST;
use common::*;
use http::{Method, StatusCode};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A two-platform image: an OCI index tagged `tag` over a linux/amd64 and a linux/arm64/v8
/// image (each a config and one layer of `size` bytes), plus an attestation entry.
struct Multi {
    index: String,
    amd64: Image,
    arm64: Image,
}

fn push_multi(reg: &FakeRegistry, repo: &str, tag: &str, size: usize, seed: u64) -> Multi {
    let amd64 = reg.push_image(repo, "build-amd64", &[pseudo_random(size, seed)]);
    let arm64 = reg.push_image(repo, "build-arm64", &[pseudo_random(size, seed + 1)]);
    let entry = |img: &Image, platform: serde_json::Value| {
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": img.manifest,
            "size": img.manifest_bytes.len(),
            "platform": platform,
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            entry(&amd64, serde_json::json!({"os": "linux", "architecture": "amd64"})),
            entry(&arm64, serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"})),
            // buildx's attestation manifests: never a platform to fetch.
            entry(&amd64, serde_json::json!({"os": "unknown", "architecture": "unknown"})),
        ],
    });
    let index = reg.push_manifest(
        repo,
        Some(tag),
        serde_json::to_vec_pretty(&index).unwrap(),
        OCI_INDEX,
    );
    Multi {
        index,
        amd64,
        arm64,
    }
}

/// Upstream GETs of `digest`'s blob so far.
fn blob_gets(reg: &FakeRegistry, digest: &str) -> usize {
    reg.requests()
        .iter()
        .filter(|r| r.kind == Kind::Blob && r.method == Method::GET && r.path.ends_with(digest))
        .count()
}

/// Runs `stowage --config <the server's> --listen <its address> <args>` off the runtime.
async fn cli(s: &Stowage, args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = dir.path().join("config.toml");
    std::fs::write(&config, &s.toml).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"));
    cmd.arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(s.addr.to_string())
        .args(args)
        .current_dir(dir.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let shown = args.join(" ");
    let out = bounded(
        "stowage prefetch",
        tokio::task::spawn_blocking(move || {
            let out = cmd.output().unwrap();
            drop(dir);
            out
        }),
    )
    .await
    .unwrap();
    eprintln!(
        "$ stowage {shown}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_takes_the_asked_platforms_and_names_what_failed() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let port = quay.port();
    let m = push_multi(&quay, "pub/multi", "1", 150_000, 10);
    let s = Stowage::builder()
        .trust(&ca)
        .toml(&format!(
            "[[registry]]\nhost = \"quay.io:{port}\"\ndeny = [\"secret/**\"]\n"
        ))
        .start()
        .await;
    let image = format!("quay.io:{port}/pub/multi:1");

    // One platform: only its manifest, config and layer come from upstream.
    let o = cli(&s, &["prefetch", "--platform", "linux/arm64", &image], &[]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains(&image))
        .expect("a line per image");
    for want in [m.index.as_str(), "platforms linux/arm64/v8", "layers 1"] {
        assert!(line.contains(want), "{want:?} not in {line:?}");
    }
    for d in m.arm64.blobs() {
        assert!(s.is_cached(&d), "arm64 {d} not cached");
        assert_eq!(blob_gets(&quay, &d), 1, "arm64 {d}");
    }
    for d in m.amd64.blobs() {
        assert!(!s.is_cached(&d), "amd64 {d} cached");
        assert_eq!(blob_gets(&quay, &d), 0, "amd64 {d} fetched");
    }
    assert!(!s.is_cached(&m.amd64.manifest));

    // Every platform (from a --file, with comments): the rest, without the first again.
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(
        &list,
        format!("# warm these\n\n  {image}   # the multi image\n"),
    )
    .unwrap();
    let o = cli(
        &s,
        &[
            "prefetch",
            "--all-platforms",
            "--file",
            list.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.contains("platforms linux/amd64,linux/arm64/v8"),
        "{out}"
    );
    for d in m.amd64.blobs().iter().chain(&m.arm64.blobs()) {
        assert!(s.is_cached(d), "{d} not cached");
        assert_eq!(blob_gets(&quay, d), 1, "{d}");
    }

    // A tag that does not exist and a denied repository: non-zero, each named with why; the
    // good one in between still done. The denied one never reaches upstream.
    let missing = format!("quay.io:{port}/pub/nope:1");
    let denied = format!("quay.io:{port}/secret/app:1");
    let o = cli(
        &s,
        &[
            "prefetch",
            "--platform",
            "linux/amd64",
            &missing,
            &image,
            &denied,
            "Not/A/Ref",
        ],
        &[],
    )
    .await;
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}{err}");
    assert!(out.contains(&image), "{out}");
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains("3 of 4 images failed"), "{err}");
    assert!(
        last.contains(&format!("{missing} (404 Not Found: MANIFEST_UNKNOWN")),
        "{err}"
    );
    assert!(
        last.contains(&format!("{denied} (403 Forbidden: DENIED")),
        "{err}"
    );
    assert!(last.contains("secret/**"), "the rule is named: {err}");
    assert!(last.contains("Not/A/Ref"), "{err}");
    assert!(
        !quay.requests().iter().any(|r| r.path.contains("/secret/")),
        "a denied repository reached upstream"
    );

    // A platform the index lacks.
    let o = cli(&s, &["prefetch", "--platform", "linux/s390x", &image], &[]).await;
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("no manifest for linux/s390x (it has: linux/amd64, linux/arm64/v8)"),
        "{err}"
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_credentials_reach_upstream_and_grant_no_one_else() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let port = quay.port();
    let img = quay.push_image("priv/app", "1", &[pseudo_random(50_000, 30)]);
    quay.make_private("priv/app");
    quay.add_user("ci", "s3cret-pw", &["priv/app"]);
    let s = Stowage::start(&ca).await;
    let image = format!("quay.io:{port}/priv/app:1");

    let o = cli(&s, &["prefetch", &image], &[]).await;
    assert!(!o.status.success(), "anonymous prefetch of a private image");
    assert!(text(&o).1.contains(&image));

    let o = cli(
        &s,
        &["prefetch", "--creds-env", "PREFETCH_CREDS", &image],
        &[("PREFETCH_CREDS", "ci:s3cret-pw")],
    )
    .await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    for d in img.blobs() {
        assert!(s.is_cached(&d), "{d} not cached");
    }
    assert!(
        quay.token_authorizations()
            .iter()
            .any(|a| a.starts_with("Basic ")),
        "the account never reached the token service"
    );
    // What the account fetched is not granted to anonymous clients: neither one without
    // any `Authorization` nor one with an anonymous token.
    let tunnel = s
        .client()
        .tunnel("quay.io", port, Alpn::Http11)
        .await
        .unwrap();
    let r = tunnel
        .get(&format!("/v2/priv/app/blobs/{}", img.layers[0]), &[])
        .await;
    assert_ne!(r.status, StatusCode::OK, "served without credentials");
    let session = Session::login(&s.client(), "quay.io", port, "priv/app", Alpn::Http11).await;
    let r = session.blob(&img.layers[0]).await;
    assert_ne!(r.status, StatusCode::OK, "served to an anonymous token");
    // A missing variable is said as such.
    let o = cli(
        &s,
        &["prefetch", "--creds-env", "NOT_SET_ANYWHERE", &image],
        &[],
    )
    .await;
    assert!(!o.status.success());
    assert!(text(&o).1.contains("NOT_SET_ANYWHERE"));
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_and_a_client_share_one_download() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let port = quay.port();
    let img = quay.push_image("pub/big", "1", &[pseudo_random(400_000, 40)]);
    let s = Stowage::start(&ca).await;
    let layer = img.layers[0].clone();
    let gate = quay.hold_blob_bodies();
    let prefetch = {
        let image = format!("quay.io:{port}/pub/big:1");
        let s = &s;
        async move { cli(s, &["prefetch", &image], &[]).await }
    };
    let client = async {
        // Once the prefetch's fill of the layer is under way upstream, a client asks too.
        eventually("the prefetch fetching the layer", || {
            blob_gets(&quay, &layer) == 1
        })
        .await;
        let session = Session::login(&s.client(), "quay.io", port, "pub/big", Alpn::Http11).await;
        let pulled = tokio::spawn(async move { session.blob(&layer).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        gate.open();
        pulled.await.unwrap()
    };
    let (o, r) = tokio::join!(prefetch, client);
    assert!(o.status.success());
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256_digest(&r.body), img.layers[0]);
    assert_eq!(
        blob_gets(&quay, &img.layers[0]),
        1,
        "two upstream downloads"
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_list_runs_at_start_up_and_on_its_interval() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let port = quay.port();
    let m = push_multi(&quay, "pub/warm", "1", 20_000, 50);
    let s = Stowage::builder()
        .trust(&ca)
        .toml(&format!(
            "[prefetch]\nimages = [\"quay.io:{port}/pub/warm:1\"]\ninterval = \"1s\"\nplatforms = [\"linux/amd64\"]\n"
        ))
        .start()
        .await;
    for d in m.amd64.blobs() {
        eventually("the warm list fetched at start-up", || s.is_cached(&d)).await;
    }
    assert!(m.arm64.blobs().iter().all(|d| !s.is_cached(d)));
    // Upstream retags: the next round resolves the tag again and fetches what changed only.
    let m2 = push_multi(&quay, "pub/warm", "1", 20_000, 60);
    for d in m2.amd64.blobs() {
        eventually("the warm list fetched the new image", || s.is_cached(&d)).await;
    }
    for d in m.amd64.blobs() {
        assert_eq!(blob_gets(&quay, &d), 1, "{d} fetched again");
    }
    // `stowage prefetch` without --platform takes `[prefetch] platforms` too.
    let o = cli(
        &s,
        &["prefetch", &format!("quay.io:{port}/pub/warm:1")],
        &[],
    )
    .await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("platforms linux/amd64  layers 1"), "{out}");
    assert!(m2.arm64.blobs().iter().all(|d| !s.is_cached(d)));
    // Shutdown stops it (stop() bounds run()'s return).
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_without_a_running_server_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir_all(dir.path().join("cache")).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\n",
            dir.path().join("cache").to_str().unwrap()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("--config")
        .arg(&config)
        .args(["prefetch", "alpine:3"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("none serves") && err.contains("stowage run"),
        "{err}"
    );
}
