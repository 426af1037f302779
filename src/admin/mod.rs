//! Cache administration: stats, listing, verify and prune.
//!
//! Each operation is one function over a `BlobStore`, used two ways: by the running
//! server at `/admin/*` on the proxy listener (loopback clients only), and by the
//! `stowage cache ...` command directly on the cache directory when no server runs
//! (the metadata store admits one process at a time).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod setup;
pub mod status;

use serde::{Deserialize, Serialize};

use crate::cache::{BlobStore, StoreError, TagChange, VerifyReport};
use crate::clock::now_ms;
use crate::oci::{Digest, ImageRef};
pub use crate::telemetry::metrics::Traffic;

/// What `GET /admin/info` answers: that this is Stowage, and which cache it serves, so that
/// `stowage cache ...` goes through a running server only for the cache it was asked about.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    /// The server's version.
    pub stowage: String,
    /// Its cache directory, absolute.
    pub cache_dir: PathBuf,
}

impl ServerInfo {
    pub fn new(cache_dir: &Path) -> ServerInfo {
        ServerInfo {
            stowage: env!("CARGO_PKG_VERSION").to_owned(),
            cache_dir: std::fs::canonicalize(cache_dir).unwrap_or_else(|_| cache_dir.to_owned()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub objects: u64,
    pub bytes: u64,
    pub max_size: u64,
    /// Bytes of pinned images (never evicted).
    #[serde(default)]
    pub pinned_bytes: u64,
    /// Present when asked of a running server.
    pub since_start: Option<Traffic>,
}

pub fn stats(store: &BlobStore, max_size: u64) -> Stats {
    Stats {
        objects: store.index.len() as u64,
        bytes: store.index.total(),
        max_size,
        pinned_bytes: store
            .pinned_objects()
            .unwrap_or_default()
            .iter()
            .filter_map(|d| store.index.get(d))
            .map(|e| e.size)
            .sum(),
        since_start: None,
    }
}

/// What `cache pin` / `cache unpin` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinReport {
    pub image: String,
    /// False when it already was (or was not) pinned.
    pub changed: bool,
    /// What the cache holds of the image now.
    pub objects: u64,
    pub bytes: u64,
}

pub fn pin(store: &BlobStore, image: &ImageRef, pinned: bool) -> Result<PinReport, StoreError> {
    let changed = store.set_pin(image, pinned)?;
    let objects = store.image_objects(image)?;
    let held: Vec<u64> = objects
        .iter()
        .filter_map(|d| store.index.get(d))
        .map(|e| e.size)
        .collect();
    Ok(PinReport {
        image: image.to_string(),
        changed,
        objects: held.len() as u64,
        bytes: held.iter().sum(),
    })
}

/// What `cache refresh` found, per stored `Accept` variant of the tag: the digest it named
/// before and the one upstream names now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshReport {
    pub image: String,
    pub variants: Vec<RefreshedVariant>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshedVariant {
    pub before: Option<String>,
    pub now: String,
}

/// What `cache forget` did: whether the tag was known.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForgetReport {
    pub image: String,
    pub forgotten: bool,
}

/// Drops a tag's row (its objects stay until evicted), so the next pull asks upstream.
pub fn forget(store: &BlobStore, image: &ImageRef) -> Result<ForgetReport, String> {
    let key = image.tag_key().ok_or_else(|| {
        format!("{image} names a digest, which never changes: forget takes a tag")
    })?;
    let known = store.tag(&key).map_err(|e| e.to_string())?.is_some();
    store.remove_tag(&key).map_err(|e| e.to_string())?;
    Ok(ForgetReport {
        image: image.to_string(),
        forgotten: known,
    })
}

/// The digests a tag resolved to, oldest first.
pub fn history(store: &BlobStore, image: &ImageRef) -> Result<Vec<TagChange>, String> {
    let key = image
        .tag_key()
        .ok_or_else(|| format!("{image} names a digest: history is kept for tags"))?;
    store.tag_history(&key).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagListing {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    pub digest: String,
    /// Bytes of this image (manifest, config, layers) present in the cache.
    pub cached_bytes: u64,
    /// Objects referenced by the manifest that are not (or no longer) cached.
    pub missing: u64,
    /// Unix milliseconds of the last use of any of its objects.
    pub last_used_ms: u64,
    /// Pinned with `cache pin` (never evicted).
    #[serde(default)]
    pub pinned: bool,
}

pub use crate::cache::references;

/// Cached tags per registry and repository, with what each holds in the cache.
pub fn list(store: &BlobStore) -> Result<Vec<TagListing>, StoreError> {
    let pins: Vec<String> = store.pins()?.iter().map(ImageRef::to_string).collect();
    let mut seen: BTreeMap<(String, String, String), TagListing> = BTreeMap::new();
    for (key, row) in store.tags()? {
        // Several Accept variants of one tag: each is listed once, the most complete wins.
        for variant in &row.variants {
            let root = variant.digest.clone();
            let mut listing = TagListing {
                registry: key.repo.registry.to_string(),
                repository: key.repo.repo.to_string(),
                tag: key.tag.as_str().to_owned(),
                digest: variant.digest.to_string(),
                cached_bytes: 0,
                missing: 0,
                last_used_ms: 0,
                pinned: pins.contains(&format!("{key}")),
            };
            // Manifest → (child manifests →) config and layers, each once.
            for d in store.walk_image(vec![root])? {
                match store.index.get(&d) {
                    Some(e) => {
                        listing.cached_bytes += e.size;
                        listing.last_used_ms = listing.last_used_ms.max(e.atime_ms);
                    }
                    None => listing.missing += 1,
                }
            }
            // Several Accept variants of one tag: keep the most complete one.
            let k = (
                listing.registry.clone(),
                listing.repository.clone(),
                listing.tag.clone(),
            );
            match seen.get(&k) {
                Some(old) if old.cached_bytes >= listing.cached_bytes => {}
                _ => {
                    seen.insert(k, listing);
                }
            }
        }
    }
    Ok(seen.into_values().collect())
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct PruneReport {
    pub objects: u64,
    pub bytes: u64,
}

pub fn prune(
    store: &BlobStore,
    max_size: Option<u64>,
    older_than: Option<Duration>,
) -> Result<PruneReport, StoreError> {
    let cutoff = older_than.map(|d| now_ms().saturating_sub(d.as_millis() as u64));
    let (objects, bytes) = store.evict(max_size.unwrap_or(u64::MAX), cutoff)?;
    Ok(PruneReport { objects, bytes })
}

/// Progress lines of a verify, for a person: one every this many objects when the output
/// is not a terminal; the server reports at least this often, and every second.
pub const VERIFY_PROGRESS_EVERY: u64 = 1000;

/// One line of `POST /admin/verify`'s answer (newline-delimited JSON): the totals first,
/// progress as it goes, each corrupt object as it is found, then the report (or the error
/// that stopped it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyEvent {
    Start { objects: u64, bytes: u64 },
    Progress { checked: u64, bytes: u64 },
    Corrupt { digest: String },
    Done(VerifyReport),
    Failed { message: String },
}

pub fn verify(
    store: &BlobStore,
    progress: impl FnMut(u64, &Digest, bool),
) -> Result<VerifyReport, StoreError> {
    store.verify(progress)
}

/// The image references of a `stowage prefetch --file`: one a line, blank lines and
/// `#` comments (whole lines, or after the reference) ignored.
pub fn parse_ref_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_once('#').map_or(l, |(before, _)| before).trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `1.5 GiB` style sizes for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::TagVariant;
    use crate::oci::Algorithm;

    fn sha(b: &[u8]) -> Digest {
        Digest::from_bytes(
            Algorithm::Sha256,
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref(),
        )
    }

    #[test]
    fn ref_lists_skip_comments_and_blank_lines() {
        let text = "# images for CI\nalpine:3\n\n   quay.io/org/app:1.2   # pinned by ops\n\t\n#quay.io/x/y:1\nregistry:5000/app@sha256:abc\n";
        assert_eq!(
            parse_ref_list(text),
            vec![
                "alpine:3",
                "quay.io/org/app:1.2",
                "registry:5000/app@sha256:abc"
            ]
        );
        assert!(parse_ref_list("# nothing\n\n").is_empty());
    }

    #[test]
    fn lists_tags_with_their_cached_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let layer = vec![7u8; 1000];
        let config = b"{}".to_vec();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": sha(&config).to_string(), "size": 2},
            "layers": [{"digest": sha(&layer).to_string(), "size": 1000}, {"digest": sha(b"gone").to_string(), "size": 4}],
        })
        .to_string();
        let md = sha(manifest.as_bytes());
        store.put(&sha(&layer), &layer).unwrap();
        store.put(&sha(&config), &config).unwrap();
        store.put(&md, manifest.as_bytes()).unwrap();
        store
            .set_media_type(&md, "application/vnd.oci.image.manifest.v1+json")
            .unwrap();
        store
            .set_tag(
                &"quay.io:5000/org/app:v1".parse().unwrap(),
                TagVariant {
                    accept: "application/json".into(),
                    digest: md.clone(),
                    media_type: "x".into(),
                    checked_at_ms: 1,
                },
            )
            .unwrap();
        let l = list(&store).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(
            (
                l[0].registry.as_str(),
                l[0].repository.as_str(),
                l[0].tag.as_str()
            ),
            ("quay.io:5000", "org/app", "v1")
        );
        assert_eq!(l[0].cached_bytes, 1000 + 2 + manifest.len() as u64);
        assert_eq!(l[0].missing, 1);
        assert!(l[0].last_used_ms > 0);
        assert_eq!(human_bytes(1536), "1.5 KiB");
        let s = stats(&store, 10);
        assert_eq!(s.objects, 3);
    }
}
