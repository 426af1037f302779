//! What we have: verified content by digest, the metadata about it, fills in progress and
//! the shared tier behind the local disk.
//!
//! - [`content`]: the content-addressed files (`blobs/<alg>/<2 hex>/<hex>`) and the store
//!   that owns them and the metadata database;
//! - [`writer`]: hash while writing, verify, fsync, rename: the only way into `blobs/`;
//! - [`fill`]: one upstream download per digest, any number of readers;
//! - [`metadata`]: tags, repository membership, public marks, media types, access times;
//! - [`index`]: sizes and last use per digest, for eviction;
//! - [`hot`]: tag rows, public marks and manifests kept in memory in front of both;
//! - [`eviction`]: the background loop that keeps the cache under `max_size`;
//! - [`shared_tier`]: an S3 bucket or shared directory for replicas.
//!
//! Invariant: content becomes visible only after its digest verifies; metadata rows only
//! after their content.

pub mod content;
pub mod eviction;
pub mod fill;
mod hot;
pub mod index;
pub mod metadata;
pub mod shared_tier;
pub mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use content::{BlobStore, StoreError, StoredManifest, VerifyReport};
pub use fill::{Fills, Join};
pub use metadata::{references, TagChange, TagRow, TagVariant, MAX_TAG_HISTORY, MAX_TAG_VARIANTS};
pub use shared_tier::Backend;
pub use writer::BlobWriter;

use crate::clock::now_ms;

/// After a cache write error, new fills are paused this long, so a full or failing disk
/// does not cause a storm of failing writes.
const WRITE_ERROR_PAUSE: Duration = Duration::from_secs(30);

/// The cache layer as the layers above use it: built once by the composition root.
pub struct Cache {
    pub store: Arc<BlobStore>,
    pub fills: Arc<Fills>,
    /// The shared tier behind the local disk, if configured.
    pub shared: Option<Arc<dyn Backend>>,
    pub limits: Limits,
    paused_until: AtomicU64,
    /// Set when a fill ran out of disk space: no new fills until free space is back to
    /// twice `min_free` (hysteresis, so one blob that does not fit does not make every
    /// next fill fail the same way).
    disk_full: AtomicBool,
}

/// Bounds from `[cache]`, validated.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_size: u64,
    pub min_free: u64,
    pub max_manifest_size: u64,
    pub max_concurrent_fills: usize,
}

impl Cache {
    pub fn new(store: Arc<BlobStore>, shared: Option<Arc<dyn Backend>>, limits: Limits) -> Cache {
        store.set_max_size(limits.max_size);
        Cache {
            store,
            fills: Arc::new(Fills::default()),
            shared,
            limits,
            paused_until: AtomicU64::new(0),
            disk_full: AtomicBool::new(false),
        }
    }

    /// Whether a new object may be written to the cache now; `Err` names why not.
    pub fn may_cache(&self) -> Result<(), &'static str> {
        if now_ms() < self.paused_until.load(Ordering::Relaxed) {
            return Err("paused after a write error");
        }
        let free = self.store.free_space();
        if self.disk_full.load(Ordering::Relaxed) {
            match free {
                Some(f) if f < self.limits.min_free.saturating_mul(2) => return Err("disk_full"),
                _ => {
                    if self.disk_full.swap(false, Ordering::Relaxed) {
                        tracing::info!(free, "free disk space is back: caching resumes");
                    }
                }
            }
        }
        match free {
            Some(free) if free < self.limits.min_free => Err("disk_full"),
            _ => Ok(()),
        }
    }

    /// Why new objects are not cached now, if they are not: `disk_full` (free space below
    /// `min_free`, or not yet back after a fill ran out) or `write_error` (for 30 s after
    /// another write error). The `stowage_caching_paused` reasons.
    pub fn paused(&self) -> Option<&'static str> {
        match self.may_cache() {
            Ok(()) => None,
            Err("disk_full") => Some("disk_full"),
            Err(_) => Some("write_error"),
        }
    }

    /// Pauses new fills until free space is back (see `disk_full`), after a fill ran out.
    pub fn pause_until_space(&self) {
        self.disk_full.store(true, Ordering::Relaxed);
    }

    /// Pauses new fills for a while after a write error.
    pub fn pause_caching(&self) {
        let until = now_ms() + WRITE_ERROR_PAUSE.as_millis() as u64;
        self.paused_until.store(until, Ordering::Relaxed);
    }
}
