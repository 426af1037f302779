//! Content-addressed storage on the local disk.
//!
//! ```text
//! <dir>/blobs/<alg>/<2 hex>/<hex>   complete, verified content (blobs and manifests)
//! <dir>/tmp/                         fills in progress; cleared at start-up
//! <dir>/meta.redb                    tags, media types, repository membership, public
//!                                    marks and access times (keys from `oci::keys`)
//! ```
//!
//! A file appears under `blobs/` only through `BlobWriter::finish`: hashed while written,
//! compared with its digest, fsynced, renamed, directory fsynced. A writer dropped before
//! `finish` removes its temp file. Paths are built only from a parsed `Digest`.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_lc_rs::digest::{Context, SHA256, SHA512};
use redb::ReadableTable;

use super::metadata::{
    drop_portless_rows, ATIMES, HISTORY, MEDIA_TYPES, MEMBERS, PINS, PUBLIC_REPOS, TAGS,
};
use super::writer::BlobWriter;

use super::hot::Hot;
use super::index::Index;
use crate::oci::{Algorithm, Digest, RepoKey, TagKey};

/// Holds the pid of the process that has `meta.redb` open, so that a second one can say
/// who holds the cache. Written once the lock is taken; stale after a crash, which is why
/// it is only read while another process holds the lock, and only believed when that
/// process exists.
const PID_FILE: &str = "stowage.pid";

/// The process named by `dir`'s pid file, when it is alive and not this one.
fn holder_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// Page cache for `meta.redb`.
const META_CACHE_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("content does not match {expected}: got {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("metadata store: {0}")]
    Meta(String),
    /// The metadata store admits one process at a time (redb's file lock).
    #[error("the cache {} is in use by another Stowage{}: stop it, or use `stowage cache ...` on its address (--listen) to go through it", dir.display(), pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse { dir: PathBuf, pid: Option<u32> },
    #[error("no cache at {}: nothing was ever cached there (check --cache-dir or [cache] dir; the server creates it when it starts)", dir.display())]
    NoCache { dir: PathBuf },
}

impl StoreError {
    /// The file system is out of space (or quota): nothing more can be written until some
    /// is freed.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ),
            _ => false,
        }
    }
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

pub struct BlobStore {
    pub(super) blobs: PathBuf,
    pub(super) tmp: PathBuf,
    pub(super) meta: redb::Database,
    pub(super) next_tmp: AtomicU64,
    /// What is on disk, with sizes and access times.
    pub index: Index,
    /// Woken when an insert takes the cache past `max_size`.
    pub pressure: tokio::sync::Notify,
    pub(super) max_size: AtomicU64,
    /// Tag rows by `TagKey`, public marks by `RepoKey`, stored manifests by digest: what a
    /// manifest hit reads, kept in memory (see [`Hot`]).
    pub(super) hot_tags: Hot<TagKey, Option<super::TagRow>>,
    pub(super) hot_public: Hot<RepoKey, Option<u64>>,
    hot_manifests: Hot<Digest, Option<Arc<StoredManifest>>>,
}

/// A stored manifest as a hit serves it: its verified bytes and media type.
#[derive(Debug)]
pub struct StoredManifest {
    pub bytes: bytes::Bytes,
    pub media_type: String,
}

/// Bounds of the hot rows (bytes, roughly): tag rows and public marks are small; manifests
/// are typically a few KiB, and the bound keeps the process's memory flat whatever they are.
const HOT_TAG_BYTES: u64 = 8 << 20;
const HOT_PUBLIC_BYTES: u64 = 1 << 20;
const HOT_MANIFEST_BYTES: u64 = 32 << 20;

/// About the bytes of `k`'s text form, for weighing hot rows.
fn repo_key_len(k: &RepoKey) -> usize {
    k.registry.host().as_str().len() + k.repo.as_str().len() + 16
}

/// What `verify` found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub corrupt: u64,
    pub bytes: u64,
}

impl BlobStore {
    /// Opens a cache that exists, for the commands that inspect one (`stowage cache ...`):
    /// a missing cache is an error, never created.
    pub fn open_existing(dir: &Path) -> Result<Arc<BlobStore>, StoreError> {
        if !dir.join("meta.redb").is_file() {
            return Err(StoreError::NoCache {
                dir: dir.to_owned(),
            });
        }
        Self::open(dir)
    }

    /// Opens (creating as needed) the cache at `dir` and clears leftovers of interrupted fills.
    pub fn open(dir: &Path) -> Result<Arc<BlobStore>, StoreError> {
        let blobs = dir.join("blobs");
        let tmp = dir.join("tmp");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let meta_path = dir.join("meta.redb");
        // redb caches pages up to 1 GiB by default; the metadata is small and hot rows are
        // few, so a bounded cache keeps the process's memory flat over months of churn.
        let meta = redb::Builder::new()
            .set_cache_size(META_CACHE_BYTES)
            .create(&meta_path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                    dir: dir.to_owned(),
                    pid: holder_pid(dir),
                },
                e => StoreError::Meta(format!("{}: {e}", meta_path.display())),
            })?;
        if let Err(e) = fs::write(dir.join(PID_FILE), format!("{}\n", std::process::id())) {
            tracing::debug!(error = %e, "could not write the cache's pid file");
        }
        let txn = meta
            .begin_write()
            .map_err(|e| StoreError::Meta(e.to_string()))?;
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        txn.open_table(MEDIA_TYPES).map_err(|e| m(&e))?;
        txn.open_table(TAGS).map_err(|e| m(&e))?;
        txn.open_table(PUBLIC_REPOS).map_err(|e| m(&e))?;
        txn.open_table(ATIMES).map_err(|e| m(&e))?;
        txn.open_multimap_table(MEMBERS).map_err(|e| m(&e))?;
        txn.open_table(HISTORY).map_err(|e| m(&e))?;
        txn.open_table(PINS).map_err(|e| m(&e))?;
        let (old_tags, old_public) = drop_portless_rows(&txn)?;
        txn.commit().map_err(|e| m(&e))?;
        if old_tags + old_public > 0 {
            tracing::warn!(
                tags = old_tags,
                public_marks = old_public,
                "dropped metadata written before registry identity included the port (which \
                 port it came from cannot be known); cached content stays, tags are asked upstream again"
            );
        }
        let store = BlobStore {
            blobs,
            tmp,
            meta,
            next_tmp: AtomicU64::new(0),
            index: Index::default(),
            pressure: tokio::sync::Notify::new(),
            max_size: AtomicU64::new(u64::MAX),
            hot_tags: Hot::new(HOT_TAG_BYTES, |k, row| {
                let variants = row.as_ref().map_or(0, |r| r.variants.len());
                (repo_key_len(&k.repo) + k.tag.as_str().len() + 64 + 256 * variants) as u32
            }),
            hot_public: Hot::new(HOT_PUBLIC_BYTES, |k, _| (repo_key_len(k) + 32) as u32),
            hot_manifests: Hot::new(HOT_MANIFEST_BYTES, |_, m| {
                m.as_ref()
                    .map_or(96, |m| (m.bytes.len() + m.media_type.len() + 96) as u32)
            }),
        };
        store.rebuild_index()?;
        Ok(Arc::new(store))
    }

    /// Scans `blobs/` (the truth) and joins persisted access times. Files whose path is not
    /// a digest are removed; access-time rows without content are dropped.
    fn rebuild_index(&self) -> Result<(), StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let mut atimes = HashMap::new();
        {
            let txn = self.meta.begin_read().map_err(|e| m(&e))?;
            let table = txn.open_table(ATIMES).map_err(|e| m(&e))?;
            for row in table.iter().map_err(|e| m(&e))? {
                let (k, v) = row.map_err(|e| m(&e))?;
                atimes.insert(k.value().to_owned(), v.value());
            }
        }
        for alg_entry in fs::read_dir(&self.blobs).map_err(io_err(&self.blobs))? {
            let alg_entry = alg_entry.map_err(io_err(&self.blobs))?;
            let alg = alg_entry.file_name().to_string_lossy().into_owned();
            for fan in fs::read_dir(alg_entry.path()).map_err(io_err(&alg_entry.path()))? {
                let fan = fan.map_err(io_err(&alg_entry.path()))?;
                let prefix = fan.file_name().to_string_lossy().into_owned();
                let Ok(files) = fs::read_dir(fan.path()) else {
                    let _ = fs::remove_file(fan.path());
                    continue;
                };
                for f in files {
                    let f = f.map_err(io_err(&fan.path()))?;
                    let name = f.file_name().to_string_lossy().into_owned();
                    let digest = format!("{alg}:{name}")
                        .parse::<Digest>()
                        .ok()
                        .filter(|d| d.hex().starts_with(&prefix));
                    let meta = f.metadata().ok().filter(|m| m.is_file());
                    match (digest, meta) {
                        (Some(d), Some(meta)) => {
                            let key = d.to_string();
                            let atime = atimes.remove(&key).or_else(|| {
                                meta.modified()
                                    .ok()
                                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                                    .map(|d| d.as_millis() as u64)
                            });
                            self.index.insert(d, meta.len(), Some(atime.unwrap_or(0)));
                        }
                        _ => {
                            tracing::warn!(path = %f.path().display(), "removing a file that is not cached content");
                            let _ =
                                fs::remove_file(f.path()).or_else(|_| fs::remove_dir_all(f.path()));
                        }
                    }
                }
            }
        }
        if !atimes.is_empty() {
            let txn = self.meta.begin_write().map_err(|e| m(&e))?;
            {
                let mut table = txn.open_table(ATIMES).map_err(|e| m(&e))?;
                for k in atimes.keys() {
                    table.remove(k.as_str()).map_err(|e| m(&e))?;
                }
            }
            txn.commit().map_err(|e| m(&e))?;
        }
        Ok(())
    }

    /// Persists access times changed since the last flush.
    pub fn flush_atimes(&self) -> Result<usize, StoreError> {
        let dirty = self.index.take_dirty();
        if dirty.is_empty() {
            return Ok(0);
        }
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_write().map_err(|e| m(&e))?;
        {
            let mut table = txn.open_table(ATIMES).map_err(|e| m(&e))?;
            for (d, t) in &dirty {
                table
                    .insert(d.to_string().as_str(), *t)
                    .map_err(|e| m(&e))?;
            }
        }
        txn.commit().map_err(|e| m(&e))?;
        Ok(dirty.len())
    }

    /// Deletes `victims` (readers holding them open keep reading: unlink does not cut
    /// them off). Returns objects and bytes removed.
    pub fn remove_objects(&self, victims: &[Digest]) -> Result<(u64, u64), StoreError> {
        let (mut n, mut bytes) = (0, 0);
        for d in victims {
            let path = self.path(d);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
            if let Some(e) = self.index.remove(d) {
                n += 1;
                bytes += e.size;
            }
        }
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_write().map_err(|e| m(&e))?;
        {
            let mut atimes = txn.open_table(ATIMES).map_err(|e| m(&e))?;
            let mut types = txn.open_table(MEDIA_TYPES).map_err(|e| m(&e))?;
            let mut members = txn.open_multimap_table(MEMBERS).map_err(|e| m(&e))?;
            for d in victims {
                let k = d.to_string();
                atimes.remove(k.as_str()).map_err(|e| m(&e))?;
                types.remove(k.as_str()).map_err(|e| m(&e))?;
                members.remove_all(k.as_str()).map_err(|e| m(&e))?;
            }
        }
        txn.commit().map_err(|e| m(&e))?;
        for d in victims {
            self.hot_manifests.written(d);
        }
        Ok((n, bytes))
    }

    /// Evicts least recently used objects until the total is at most `target` bytes, and
    /// every object unused since `older_than_ms` when given.
    /// Pinned objects (`cache pin`) are never evicted: the target is met with the others,
    /// and a warning says so when the pins alone exceed it.
    pub fn evict(&self, target: u64, older_than_ms: Option<u64>) -> Result<(u64, u64), StoreError> {
        let pinned = self.pinned_objects()?;
        let pinned_bytes: u64 = pinned
            .iter()
            .filter_map(|d| self.index.get(d))
            .map(|e| e.size)
            .sum();
        if pinned_bytes > target && older_than_ms.is_none() {
            tracing::warn!(
                pinned_bytes,
                target,
                "pinned images alone exceed the cache bound; evicting everything else"
            );
        }
        let victims: Vec<Digest> = self
            .index
            .victims_except(target, older_than_ms, &pinned)
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        if victims.is_empty() {
            return Ok((0, 0));
        }
        self.remove_objects(&victims)
    }

    /// Re-hashes every object; corrupt ones are removed. `progress` gets bytes checked.
    pub fn verify(
        &self,
        mut progress: impl FnMut(u64, &Digest, bool),
    ) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let mut corrupt = Vec::new();
        for (d, _) in self.index.snapshot() {
            let path = self.path(&d);
            let ok = match File::open(&path) {
                Ok(mut f) => {
                    let alg = match d.algorithm() {
                        Algorithm::Sha256 => &SHA256,
                        Algorithm::Sha512 => &SHA512,
                    };
                    let mut ctx = Context::new(alg);
                    let mut buf = vec![0u8; 1 << 20];
                    let mut n = 0u64;
                    loop {
                        let r = io::Read::read(&mut f, &mut buf).map_err(io_err(&path))?;
                        if r == 0 {
                            break;
                        }
                        ctx.update(&buf[..r]);
                        n += r as u64;
                    }
                    report.bytes += n;
                    Digest::from_bytes(d.algorithm(), ctx.finish().as_ref()) == d
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(io_err(&path)(e)),
            };
            report.checked += 1;
            if !ok {
                report.corrupt += 1;
                corrupt.push(d.clone());
            }
            progress(report.bytes, &d, ok);
        }
        if !corrupt.is_empty() {
            self.remove_objects(&corrupt)?;
        }
        Ok(report)
    }

    /// The size above which inserts wake the evictor.
    pub fn set_max_size(&self, bytes: u64) {
        self.max_size.store(bytes, Ordering::Relaxed);
    }

    /// Bytes free for the cache directory's file system (for unprivileged users).
    pub fn free_space(&self) -> Option<u64> {
        let s = rustix::fs::statvfs(&self.blobs).ok()?;
        Some(s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Where verified content for `digest` lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Opens verified content, with its length, or `None` when absent. Counts as a use.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<(File, u64)>, StoreError> {
        let path = self.path(digest);
        match File::open(&path) {
            Ok(f) => {
                let len = f.metadata().map_err(io_err(&path))?.len();
                self.index.touch(digest);
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Starts writing content expected to hash to `digest`.
    pub fn writer(self: &Arc<Self>, digest: &Digest) -> Result<BlobWriter, StoreError> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self
            .tmp
            .join(format!("{}-{}.{}", digest.hex(), std::process::id(), n));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let algorithm = match digest.algorithm() {
            Algorithm::Sha256 => &SHA256,
            Algorithm::Sha512 => &SHA512,
        };
        Ok(BlobWriter {
            store: self.clone(),
            file: Arc::new(file),
            tmp: path,
            dest: self.path(digest),
            expected: digest.clone(),
            hasher: Context::new(algorithm),
            written: 0,
            finished: false,
        })
    }

    /// Stores a complete, small object (a manifest) after checking its digest.
    pub fn put(self: &Arc<Self>, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        if self.contains(digest) {
            return Ok(());
        }
        let mut w = self.writer(digest)?;
        w.write(bytes)?;
        w.finish()
    }

    pub fn media_type(&self, digest: &Digest) -> Result<Option<String>, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_read().map_err(|e| m(&e))?;
        let table = txn.open_table(MEDIA_TYPES).map_err(|e| m(&e))?;
        let key = digest.to_string();
        let value = table.get(key.as_str()).map_err(|e| m(&e))?;
        Ok(value.map(|v| v.value().to_owned()))
    }

    /// Records a manifest's media type. Called after its content is in place, so a crash in
    /// between leaves content without a type (refetched), never a type without content.
    pub fn set_media_type(&self, digest: &Digest, media_type: &str) -> Result<(), StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_write().map_err(|e| m(&e))?;
        {
            let mut table = txn.open_table(MEDIA_TYPES).map_err(|e| m(&e))?;
            let key = digest.to_string();
            table.insert(key.as_str(), media_type).map_err(|e| m(&e))?;
        }
        txn.commit().map_err(|e| m(&e))?;
        self.hot_manifests.written(digest);
        Ok(())
    }

    /// A stored manifest (content and media type both present), from memory when it was
    /// served lately. Counts as a use. Manifests are bounded by `[cache] max_manifest_size`
    /// when they are fetched, so reading one whole is what a fill of it did too.
    pub fn manifest(&self, digest: &Digest) -> Result<Option<Arc<StoredManifest>>, StoreError> {
        let found = self.hot_manifests.get_or_read(
            digest,
            || digest.clone(),
            || self.read_manifest(digest),
        )?;
        if found.is_some() {
            self.index.touch(digest);
        }
        Ok(found)
    }

    fn read_manifest(&self, digest: &Digest) -> Result<Option<Arc<StoredManifest>>, StoreError> {
        let Some(media_type) = self.media_type(digest)? else {
            return Ok(None);
        };
        let path = self.path(digest);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        // What is kept in memory is served for as long as it is kept: check it once here
        // (a few microseconds for a manifest) so a file changed on disk is never what
        // memory serves. A mismatch is removed (as `verify` removes it) and is a miss: the
        // manifest is fetched and stored again.
        let alg = match digest.algorithm() {
            Algorithm::Sha256 => &SHA256,
            Algorithm::Sha512 => &SHA512,
        };
        let got = Digest::from_bytes(
            digest.algorithm(),
            aws_lc_rs::digest::digest(alg, &bytes).as_ref(),
        );
        if got != *digest {
            tracing::warn!(%digest, path = %path.display(), "stored manifest does not match its digest; removed, it will be fetched again");
            self.remove_objects(std::slice::from_ref(digest))?;
            return Ok(None);
        }
        Ok(Some(Arc::new(StoredManifest {
            bytes: bytes.into(),
            media_type,
        })))
    }
}

impl Drop for BlobStore {
    /// The pid file goes with the lock (when it is still ours).
    fn drop(&mut self) {
        if let Some(dir) = self.blobs.parent() {
            let path = dir.join(PID_FILE);
            let ours =
                fs::read_to_string(&path).is_ok_and(|s| s.trim() == std::process::id().to_string());
            if ours {
                let _ = fs::remove_file(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(b: &[u8]) -> Digest {
        Digest::from_bytes(
            Algorithm::Sha256,
            aws_lc_rs::digest::digest(&SHA256, b).as_ref(),
        )
    }

    fn tmp_entries(dir: &Path) -> usize {
        fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    #[test]
    fn verified_content_lands_under_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = b"hello layer".repeat(1000);
        let d = sha256(&data);
        let mut w = store.writer(&d).unwrap();
        w.write(&data[..10]).unwrap();
        w.write(&data[10..]).unwrap();
        w.finish().unwrap();
        let path = store.path(&d);
        assert!(path.ends_with(format!("blobs/sha256/{}/{}", &d.hex()[..2], d.hex())));
        assert_eq!(fs::read(path).unwrap(), data);
        assert_eq!(tmp_entries(dir.path()), 0);
    }

    #[test]
    fn a_mismatch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = sha256(b"expected");
        let mut w = store.writer(&d).unwrap();
        w.write(b"something else").unwrap();
        assert!(matches!(w.finish(), Err(StoreError::Mismatch { .. })));
        assert!(!store.contains(&d));
        assert_eq!(tmp_entries(dir.path()), 0);
    }

    #[test]
    fn a_dropped_writer_leaves_nothing_and_tmp_is_cleared_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = sha256(b"x");
        let mut w = store.writer(&d).unwrap();
        w.write(b"partial").unwrap();
        drop(w);
        assert_eq!(tmp_entries(dir.path()), 0);
        fs::write(dir.path().join("tmp/leftover"), b"junk").unwrap();
        drop(store);
        let _store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(tmp_entries(dir.path()), 0);
    }

    #[test]
    fn a_manifest_changed_on_disk_is_not_served_and_a_served_one_stays_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let body = br#"{"schemaVersion":2}"#;
        let d = sha256(body);
        store.put(&d, body).unwrap();
        store.set_media_type(&d, oci).unwrap();
        let m = store.manifest(&d).unwrap().expect("stored");
        assert_eq!(&m.bytes[..], body);
        assert_eq!(m.media_type, oci);
        // Kept: what was read and checked is served even after the file goes.
        fs::remove_file(store.path(&d)).unwrap();
        assert!(store.manifest(&d).unwrap().is_some());
        // A write to it (here: its media type) drops the kept copy; the file is read again,
        // and a file whose bytes are not the digest's is removed, a miss and not a hit.
        fs::write(store.path(&d), br#"{"schemaVersion":3}"#).unwrap();
        store.set_media_type(&d, oci).unwrap();
        assert!(
            store.manifest(&d).unwrap().is_none(),
            "a changed file was served"
        );
        assert!(
            !store.contains(&d) && !store.path(&d).exists(),
            "the changed file stays"
        );
        // So it can be stored again, and is served again.
        store.put(&d, body).unwrap();
        store.set_media_type(&d, oci).unwrap();
        assert!(store.manifest(&d).unwrap().is_some());
        // Eviction drops it from memory too.
        store.remove_objects(std::slice::from_ref(&d)).unwrap();
        assert!(
            store.manifest(&d).unwrap().is_none(),
            "an evicted manifest was served"
        );
    }

    #[test]
    fn media_types_persist() {
        let dir = tempfile::tempdir().unwrap();
        let d = sha256(b"{}");
        {
            let store = BlobStore::open(dir.path()).unwrap();
            store.put(&d, b"{}").unwrap();
            store
                .set_media_type(&d, "application/vnd.oci.image.manifest.v1+json")
                .unwrap();
        }
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(
            store.media_type(&d).unwrap().as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        assert!(store.put(&sha256(b"a"), b"b").is_err());
    }

    #[test]
    fn the_index_is_rebuilt_from_disk_with_persisted_access_times() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (sha256(b"aaaa"), sha256(b"bb"));
        {
            let store = BlobStore::open(dir.path()).unwrap();
            store.put(&a, b"aaaa").unwrap();
            store.put(&b, b"bb").unwrap();
            assert_eq!(store.index.total(), 6);
            store.flush_atimes().unwrap();
        }
        let before = BlobStore::open(dir.path()).unwrap().index.get(&a).unwrap();
        // Debris in blobs/ is removed, content removed behind our back is forgotten.
        fs::write(dir.path().join("blobs/sha256/zz"), b"junk").unwrap();
        fs::remove_file(BlobStore::open(dir.path()).unwrap().path(&b)).unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(store.index.len(), 1);
        assert_eq!(store.index.get(&a).unwrap().atime_ms, before.atime_ms);
        assert!(!dir.path().join("blobs/sha256/zz").exists());
    }

    #[test]
    fn eviction_removes_least_recently_used_and_verify_removes_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let objs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 100]).collect();
        for (i, o) in objs.iter().enumerate() {
            let d = sha256(o);
            store.put(&d, o).unwrap();
            store.index.insert(d, 100, Some(i as u64));
        }
        let (n, bytes) = store.evict(250, None).unwrap();
        assert_eq!((n, bytes), (2, 200));
        assert!(!store.contains(&sha256(&objs[0])) && !store.contains(&sha256(&objs[1])));
        assert!(store.contains(&sha256(&objs[2])));
        fs::write(store.path(&sha256(&objs[3])), vec![9u8; 100]).unwrap();
        let report = store.verify(|_, _, _| {}).unwrap();
        assert_eq!((report.checked, report.corrupt), (2, 1));
        assert!(!store.contains(&sha256(&objs[3])));
        assert_eq!(store.index.len(), 1);
    }
}
