//! Manifests and indexes as the cache handles them, and the content store under them.
//!
//! The registry API never interprets a manifest: it is stored as bytes, keyed by the
//! digest the client asked for, else `Docker-Content-Digest`, else the body's SHA-256, and
//! only when `Content-Type` is a manifest type (`registry_api::manifests`). JSON is parsed
//! in one place, `admin::references` (`cache ls`: what an image holds). Persisted tag rows
//! (`cache::TagRow`) are JSON too.
//!
//! The input is `<1 byte: chunking><body>`. Asserts:
//! - `admin::references`: no panic; every digest it returns is a valid digest;
//! - `TagRow` JSON: what parses serialises and parses back to the same row;
//! - the store: the body written in chunks under its own SHA-256 is stored and the stored
//!   file hashes to its name; under any other digest it is refused and leaves no file, and
//!   no temp file either; `put` agrees.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

#[path = "common/stale.rs"]
mod stale;
use stowage::cache::{BlobStore, StoreError, TagRow};
use stowage::oci::{Algorithm, Digest};

fn sha256(b: &[u8]) -> Digest {
    Digest::from_bytes(
        Algorithm::Sha256,
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref(),
    )
}

fn store() -> &'static (Arc<BlobStore>, std::path::PathBuf) {
    static STORE: OnceLock<(Arc<BlobStore>, std::path::PathBuf)> = OnceLock::new();
    STORE.get_or_init(|| {
        // tmpfs when there is one: the store fsyncs every object.
        let base = ["/dev/shm", "/tmp"]
            .into_iter()
            .find(|p| std::path::Path::new(p).is_dir())
            .unwrap();
        stale::remove_stale(std::path::Path::new(base));
        let dir = std::path::Path::new(base)
            .join(format!("stowage-fuzz-manifest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (BlobStore::open(&dir).expect("store opens"), dir)
    })
}

fn no_temp_files(dir: &std::path::Path) {
    let tmp = dir.join("tmp");
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        let left: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "temp files left behind: {left:?}");
    }
}

fn stored_hashes_to(store: &BlobStore, d: &Digest) {
    let bytes = std::fs::read(store.path(d)).expect("stored object readable");
    assert_eq!(
        &sha256(&bytes),
        d,
        "stored object does not hash to its name"
    );
}

fn content(chunking: u8, body: &[u8]) {
    let (store, dir) = store();
    let right = sha256(body);
    // A digest that is not the body's: the body's with its first hex digit changed.
    let wrong: Digest = {
        let hex = right.hex();
        let first = if hex.starts_with('0') { '1' } else { '0' };
        format!("sha256:{first}{}", &hex[1..]).parse().unwrap()
    };
    let step = 1 + chunking as usize;
    for (digest, ok) in [(&wrong, false), (&right, true)] {
        let had = store.contains(digest);
        let mut w = store.writer(digest).expect("writer");
        for c in body.chunks(step) {
            w.write(c).expect("write");
        }
        match (w.finish(), ok) {
            (Ok(()), true) => stored_hashes_to(store, digest),
            (Err(StoreError::Mismatch { expected, actual }), false) => {
                assert_eq!(&expected, digest);
                assert_eq!(actual, right);
                assert_eq!(
                    store.contains(digest),
                    had,
                    "a refused write became visible"
                );
            }
            (r, ok) => panic!("write of {} bytes, digest ok {ok}: {r:?}", body.len()),
        }
        no_temp_files(dir);
    }
    assert!(store.put(&right, body).is_ok());
    assert!(matches!(
        store.put(&wrong, body),
        Err(StoreError::Mismatch { .. })
    ));
    assert!(!store.contains(&wrong));
    no_temp_files(dir);
    // Keep the store small: each input adds one object.
    let _ = store.remove_objects(&[right]);
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunking, body)) = data.split_first() else {
        return;
    };
    for d in stowage::admin::references(body) {
        assert_eq!(d.to_string().parse::<Digest>().as_ref(), Ok(&d));
    }
    if let Ok(row) = serde_json::from_slice::<TagRow>(body) {
        let text = serde_json::to_string(&row).expect("a row serialises");
        let again: TagRow = serde_json::from_str(&text).expect("a serialised row parses");
        assert_eq!(again, row);
    }
    content(chunking, body);
});
