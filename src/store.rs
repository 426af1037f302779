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
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_lc_rs::digest::{Context, SHA256, SHA512};
use redb::{MultimapTableDefinition, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::index::Index;
use crate::oci::{Algorithm, Digest, RepoKey, TagKey};

/// Page cache for `meta.redb`.
const META_CACHE_BYTES: usize = 16 << 20;

const MEDIA_TYPES: TableDefinition<&str, &str> = TableDefinition::new("media_types");
/// `TagKey` (`<registry>/<repo>:<tag>`) → JSON `TagRow`.
const TAGS: TableDefinition<&str, &str> = TableDefinition::new("tags_v2");
/// `<digest>` → unix milliseconds of the last read (LRU eviction survives restarts).
const ATIMES: TableDefinition<&str, u64> = TableDefinition::new("atimes");
/// `RepoKey` → unix milliseconds when upstream last served it without credentials.
const PUBLIC_REPOS: TableDefinition<&str, u64> = TableDefinition::new("public_v2");
/// `<digest>` → every `RepoKey` upstream has served it under: a digest is served under a
/// repository only where it is known to belong (as distribution links blobs to
/// repositories). Keyed by digest so eviction drops an object's rows at once.
const MEMBERS: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("members_v1");
/// Written before registries had ports: `<host>/<repo>:<tag>#<accept>` and `<host>/<repo>`.
/// Which port such a row came from cannot be known, so they are dropped on open.
const TAGS_V1: TableDefinition<&str, &str> = TableDefinition::new("tags");
const PUBLIC_REPOS_V1: TableDefinition<&str, u64> = TableDefinition::new("public_repos");

/// Most `Accept` variants remembered for one tag.
pub const MAX_TAG_VARIANTS: usize = 16;

/// What a tag pointed to, for one `Accept` variant, when last fetched or revalidated.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TagVariant {
    /// The client's `Accept` list, normalised (see `registry::accept_key`).
    pub accept: String,
    pub digest: Digest,
    pub media_type: String,
    /// Unix milliseconds of the last upstream confirmation.
    pub checked_at_ms: u64,
}

impl TagVariant {
    /// Whether upstream confirmed it within `ttl` before `now_ms`.
    pub fn is_fresh(&self, now_ms: u64, ttl: std::time::Duration) -> bool {
        now_ms.saturating_sub(self.checked_at_ms) < ttl.as_millis() as u64
    }
}

/// Everything known about one tag (`TagKey`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TagRow {
    pub variants: Vec<TagVariant>,
}

impl TagRow {
    pub fn variant(&self, accept: &str) -> Option<&TagVariant> {
        self.variants.iter().find(|v| v.accept == accept)
    }

    /// Replaces the variant for its `accept`, newest first, bounded.
    fn put(&mut self, variant: TagVariant) {
        self.variants.retain(|v| v.accept != variant.accept);
        self.variants.insert(0, variant);
        self.variants.truncate(MAX_TAG_VARIANTS);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("content does not match {expected}: got {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("metadata store: {0}")]
    Meta(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
    meta: redb::Database,
    next_tmp: AtomicU64,
    /// What is on disk, with sizes and access times.
    pub index: Index,
    /// Woken when an insert takes the cache past `max_size`.
    pub pressure: tokio::sync::Notify,
    max_size: AtomicU64,
}

/// What `verify` found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub corrupt: u64,
    pub bytes: u64,
}

impl BlobStore {
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
            .map_err(|e| StoreError::Meta(format!("{}: {e}", meta_path.display())))?;
        let txn = meta
            .begin_write()
            .map_err(|e| StoreError::Meta(e.to_string()))?;
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        txn.open_table(MEDIA_TYPES).map_err(|e| m(&e))?;
        txn.open_table(TAGS).map_err(|e| m(&e))?;
        txn.open_table(PUBLIC_REPOS).map_err(|e| m(&e))?;
        txn.open_table(ATIMES).map_err(|e| m(&e))?;
        txn.open_multimap_table(MEMBERS).map_err(|e| m(&e))?;
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
        Ok((n, bytes))
    }

    /// Evicts least recently used objects until the total is at most `target` bytes, and
    /// every object unused since `older_than_ms` when given.
    pub fn evict(&self, target: u64, older_than_ms: Option<u64>) -> Result<(u64, u64), StoreError> {
        let victims: Vec<Digest> = self
            .index
            .victims(target, older_than_ms)
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
        txn.commit().map_err(|e| m(&e))
    }
}

impl BlobStore {
    /// Every recorded tag.
    pub fn tags(&self) -> Result<Vec<(TagKey, TagRow)>, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_read().map_err(|e| m(&e))?;
        let table = txn.open_table(TAGS).map_err(|e| m(&e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| m(&e))? {
            let (k, v) = row.map_err(|e| m(&e))?;
            if let (Ok(key), Ok(row)) = (k.value().parse(), serde_json::from_str(v.value())) {
                out.push((key, row));
            }
        }
        Ok(out)
    }

    pub fn tag(&self, key: &TagKey) -> Result<Option<TagRow>, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_read().map_err(|e| m(&e))?;
        let table = txn.open_table(TAGS).map_err(|e| m(&e))?;
        let value = table.get(key.to_string().as_str()).map_err(|e| m(&e))?;
        // A row that does not parse is treated as absent: it will be refetched.
        Ok(value.and_then(|v| serde_json::from_str(v.value()).ok()))
    }

    /// Records what `key` points to for one `Accept` variant, and that the manifest belongs
    /// to the tag's repository, in one transaction. Only after the manifest itself is stored.
    pub fn set_tag(&self, key: &TagKey, variant: TagVariant) -> Result<(), StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let k = key.to_string();
        let txn = self.meta.begin_write().map_err(|e| m(&e))?;
        {
            let mut table = txn.open_table(TAGS).map_err(|e| m(&e))?;
            let mut row: TagRow = table
                .get(k.as_str())
                .map_err(|e| m(&e))?
                .and_then(|v| serde_json::from_str(v.value()).ok())
                .unwrap_or_default();
            let digest = variant.digest.to_string();
            row.put(variant);
            let json = serde_json::to_string(&row).map_err(|e| m(&e))?;
            table.insert(k.as_str(), json.as_str()).map_err(|e| m(&e))?;
            let mut members = txn.open_multimap_table(MEMBERS).map_err(|e| m(&e))?;
            members
                .insert(digest.as_str(), key.repo.to_string().as_str())
                .map_err(|e| m(&e))?;
        }
        txn.commit().map_err(|e| m(&e))
    }

    /// Forgets a tag (every variant).
    pub fn remove_tag(&self, key: &TagKey) -> Result<(), StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_write().map_err(|e| m(&e))?;
        {
            let mut table = txn.open_table(TAGS).map_err(|e| m(&e))?;
            table.remove(key.to_string().as_str()).map_err(|e| m(&e))?;
        }
        txn.commit().map_err(|e| m(&e))
    }

    /// When upstream last served `repo` without credentials, if it ever did.
    pub fn public_since(&self, repo: &RepoKey) -> Result<Option<u64>, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_read().map_err(|e| m(&e))?;
        let table = txn.open_table(PUBLIC_REPOS).map_err(|e| m(&e))?;
        let value = table.get(repo.to_string().as_str()).map_err(|e| m(&e))?;
        Ok(value.map(|v| v.value()))
    }

    /// Records (`Some`) or forgets (`None`) that a repository is readable anonymously.
    pub fn set_public(&self, repo: &RepoKey, at: Option<u64>) -> Result<(), StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let k = repo.to_string();
        let txn = self.meta.begin_write().map_err(|e| m(&e))?;
        {
            let mut table = txn.open_table(PUBLIC_REPOS).map_err(|e| m(&e))?;
            match at {
                Some(t) => {
                    table.insert(k.as_str(), t).map_err(|e| m(&e))?;
                }
                None => {
                    table.remove(k.as_str()).map_err(|e| m(&e))?;
                }
            }
        }
        txn.commit().map_err(|e| m(&e))
    }

    /// Whether upstream has served `digest` under `repo`.
    pub fn is_member(&self, repo: &RepoKey, digest: &Digest) -> Result<bool, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_read().map_err(|e| m(&e))?;
        let table = txn.open_multimap_table(MEMBERS).map_err(|e| m(&e))?;
        let want = repo.to_string();
        for v in table.get(digest.to_string().as_str()).map_err(|e| m(&e))? {
            if v.map_err(|e| m(&e))?.value() == want {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Records that upstream served `digest` under `repo`.
    pub fn add_member(&self, repo: &RepoKey, digest: &Digest) -> Result<(), StoreError> {
        if self.is_member(repo, digest)? {
            return Ok(());
        }
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_write().map_err(|e| m(&e))?;
        {
            let mut table = txn.open_multimap_table(MEMBERS).map_err(|e| m(&e))?;
            table
                .insert(digest.to_string().as_str(), repo.to_string().as_str())
                .map_err(|e| m(&e))?;
        }
        txn.commit().map_err(|e| m(&e))
    }

    /// The repositories `digest` is known to belong to.
    pub fn members(&self, digest: &Digest) -> Result<Vec<RepoKey>, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_read().map_err(|e| m(&e))?;
        let table = txn.open_multimap_table(MEMBERS).map_err(|e| m(&e))?;
        let mut out = Vec::new();
        for v in table.get(digest.to_string().as_str()).map_err(|e| m(&e))? {
            if let Ok(k) = v.map_err(|e| m(&e))?.value().parse() {
                out.push(k);
            }
        }
        Ok(out)
    }
}

/// Deletes the tables of the port-less format, returning how many rows each held.
fn drop_portless_rows(txn: &redb::WriteTransaction) -> Result<(u64, u64), StoreError> {
    let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
    let mut counts = (0, 0);
    let names: Vec<String> = txn
        .list_tables()
        .map_err(|e| m(&e))?
        .map(|t| redb::TableHandle::name(&t).to_owned())
        .collect();
    if names.iter().any(|n| n == "tags") {
        counts.0 = txn
            .open_table(TAGS_V1)
            .map_err(|e| m(&e))?
            .len()
            .map_err(|e| m(&e))?;
        txn.delete_table(TAGS_V1).map_err(|e| m(&e))?;
    }
    if names.iter().any(|n| n == "public_repos") {
        counts.1 = txn
            .open_table(PUBLIC_REPOS_V1)
            .map_err(|e| m(&e))?
            .len()
            .map_err(|e| m(&e))?;
        txn.delete_table(PUBLIC_REPOS_V1).map_err(|e| m(&e))?;
    }
    Ok(counts)
}

/// A fill in progress: a temp file being hashed as it is written. Readers of a growing
/// fill share `file()` and read it with positioned reads.
pub struct BlobWriter {
    store: Arc<BlobStore>,
    file: Arc<File>,
    tmp: PathBuf,
    dest: PathBuf,
    expected: Digest,
    hasher: Context,
    written: u64,
    finished: bool,
}

impl BlobWriter {
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        (&*self.file).write_all(bytes).map_err(io_err(&self.tmp))?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Whether what was written so far hashes to the expected digest.
    pub fn verify(&self) -> Result<(), StoreError> {
        let actual = Digest::from_bytes(
            self.expected.algorithm(),
            self.hasher.clone().finish().as_ref(),
        );
        if actual != self.expected {
            return Err(StoreError::Mismatch {
                expected: self.expected.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Verifies the digest, then makes the content durable and visible. On a mismatch the
    /// temp file is removed (by drop) and nothing becomes visible.
    pub fn finish(self) -> Result<(), StoreError> {
        let dir = self.publish()?;
        sync_dir(&dir)
    }

    /// `finish` but for its last step: verified, `sync_all`, renamed into place and indexed;
    /// the rename itself is made durable by [`sync_dir`] on the returned directory. A fill
    /// lets its readers go on the stored file before that fsync: after a crash in between
    /// the blob is merely fetched again.
    pub fn publish(mut self) -> Result<PathBuf, StoreError> {
        self.verify()?;
        self.file.sync_all().map_err(io_err(&self.tmp))?;
        let dir = self
            .dest
            .parent()
            .expect("blob paths have a parent")
            .to_owned();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // Same content under the same name: if another fill got there first, rename simply
        // replaces identical bytes.
        fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        self.finished = true;
        self.store
            .index
            .insert(self.expected.clone(), self.written, None);
        if self.store.index.total() > self.store.max_size.load(Ordering::Relaxed) {
            self.store.pressure.notify_one();
        }
        Ok(dir)
    }
}

/// Makes renames in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_file(&self.tmp);
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

    #[test]
    fn tags_public_marks_and_membership_persist_per_registry() {
        let dir = tempfile::tempdir().unwrap();
        let key: TagKey = "quay.io:5000/a:latest".parse().unwrap();
        let other: TagKey = "quay.io/a:latest".parse().unwrap();
        let v = TagVariant {
            accept: String::new(),
            digest: sha256(b"m"),
            media_type: "x".into(),
            checked_at_ms: 7,
        };
        {
            let store = BlobStore::open(dir.path()).unwrap();
            assert_eq!(store.tag(&key).unwrap(), None);
            store.set_tag(&key, v.clone()).unwrap();
            store.set_public(&key.repo, Some(9)).unwrap();
            store.set_public(&other.repo, Some(9)).unwrap();
            store.set_public(&other.repo, None).unwrap();
            store.add_member(&other.repo, &sha256(b"layer")).unwrap();
        }
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(store.tag(&key).unwrap().unwrap().variant(""), Some(&v));
        assert_eq!(
            store.tag(&other).unwrap(),
            None,
            "another port is another registry"
        );
        assert_eq!(store.public_since(&key.repo).unwrap(), Some(9));
        assert_eq!(store.public_since(&other.repo).unwrap(), None);
        assert!(
            store.is_member(&key.repo, &sha256(b"m")).unwrap(),
            "a tag's manifest belongs to its repository"
        );
        assert!(!store.is_member(&other.repo, &sha256(b"m")).unwrap());
        assert!(store.is_member(&other.repo, &sha256(b"layer")).unwrap());
        assert!(!store.is_member(&key.repo, &sha256(b"layer")).unwrap());
        assert_eq!(
            store.members(&sha256(b"layer")).unwrap(),
            vec![other.repo.clone()]
        );
    }

    #[test]
    fn variants_are_per_accept_newest_first_and_bounded() {
        let mut row = TagRow::default();
        for i in 0..(MAX_TAG_VARIANTS + 3) {
            row.put(TagVariant {
                accept: format!("a{i}"),
                digest: sha256(&[i as u8]),
                media_type: "x".into(),
                checked_at_ms: i as u64,
            });
        }
        assert_eq!(row.variants.len(), MAX_TAG_VARIANTS);
        assert_eq!(row.variants[0].accept, format!("a{}", MAX_TAG_VARIANTS + 2));
        assert!(row.variant("a0").is_none());
        let v = &row.variants[0];
        assert!(v.is_fresh(v.checked_at_ms + 999, std::time::Duration::from_secs(1)));
        assert!(!v.is_fresh(v.checked_at_ms + 1000, std::time::Duration::from_secs(1)));
    }
}
