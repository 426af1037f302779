//! Content-addressed storage on the local disk.
//!
//! ```text
//! <dir>/blobs/<alg>/<2 hex>/<hex>   complete, verified content (blobs and manifests)
//! <dir>/tmp/                         fills in progress; cleared at start-up
//! <dir>/meta.redb                    media types of cached manifests
//! ```
//!
//! A file appears under `blobs/` only through `BlobWriter::finish`: hashed while written,
//! compared with its digest, fsynced, renamed, directory fsynced. A writer dropped before
//! `finish` removes its temp file. Paths are built only from a parsed `Digest`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_lc_rs::digest::{Context, SHA256, SHA512};
use redb::TableDefinition;

use crate::oci::{Algorithm, Digest};

const MEDIA_TYPES: TableDefinition<&str, &str> = TableDefinition::new("media_types");
/// `<registry>/<repo>:<tag>#<accept>` → JSON `TagEntry`.
const TAGS: TableDefinition<&str, &str> = TableDefinition::new("tags");
/// `<registry>/<repo>` → unix seconds when upstream last served it without credentials.
const PUBLIC_REPOS: TableDefinition<&str, u64> = TableDefinition::new("public_repos");

/// What a tag pointed to when it was last fetched or revalidated upstream.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TagEntry {
    pub digest: String,
    pub media_type: String,
    /// Unix milliseconds of the last upstream confirmation.
    pub checked_at_ms: u64,
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
    move |source| StoreError::Io { path: path.to_owned(), source }
}

pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
    meta: redb::Database,
    next_tmp: AtomicU64,
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
        let meta = redb::Database::create(&meta_path).map_err(|e| StoreError::Meta(format!("{}: {e}", meta_path.display())))?;
        let txn = meta.begin_write().map_err(|e| StoreError::Meta(e.to_string()))?;
        txn.open_table(MEDIA_TYPES).map_err(|e| StoreError::Meta(e.to_string()))?;
        txn.open_table(TAGS).map_err(|e| StoreError::Meta(e.to_string()))?;
        txn.open_table(PUBLIC_REPOS).map_err(|e| StoreError::Meta(e.to_string()))?;
        txn.commit().map_err(|e| StoreError::Meta(e.to_string()))?;
        Ok(Arc::new(BlobStore { blobs, tmp, meta, next_tmp: AtomicU64::new(0) }))
    }

    /// Where verified content for `digest` lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs.join(digest.algorithm().as_str()).join(&hex[..2]).join(hex)
    }

    /// Opens verified content, with its length, or `None` when absent.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<(File, u64)>, StoreError> {
        let path = self.path(digest);
        match File::open(&path) {
            Ok(f) => {
                let len = f.metadata().map_err(io_err(&path))?.len();
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
    pub fn writer(&self, digest: &Digest) -> Result<BlobWriter, StoreError> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{}.{}", digest.hex(), std::process::id(), n));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io_err(&path))?;
        let algorithm = match digest.algorithm() {
            Algorithm::Sha256 => &SHA256,
            Algorithm::Sha512 => &SHA512,
        };
        Ok(BlobWriter {
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
    pub fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
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
    pub fn tag(&self, key: &str) -> Result<Option<TagEntry>, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_read().map_err(|e| m(&e))?;
        let table = txn.open_table(TAGS).map_err(|e| m(&e))?;
        let value = table.get(key).map_err(|e| m(&e))?;
        // An entry that does not parse is treated as absent: it will be refetched.
        Ok(value.and_then(|v| serde_json::from_str(v.value()).ok()))
    }

    /// Records a tag → digest entry. Only after the manifest content itself is stored.
    pub fn set_tag(&self, key: &str, entry: &TagEntry) -> Result<(), StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let json = serde_json::to_string(entry).map_err(|e| m(&e))?;
        let txn = self.meta.begin_write().map_err(|e| m(&e))?;
        {
            let mut table = txn.open_table(TAGS).map_err(|e| m(&e))?;
            table.insert(key, json.as_str()).map_err(|e| m(&e))?;
        }
        txn.commit().map_err(|e| m(&e))
    }

    /// When upstream last served `repo_key` without credentials, if it ever did.
    pub fn public_since(&self, repo_key: &str) -> Result<Option<u64>, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_read().map_err(|e| m(&e))?;
        let table = txn.open_table(PUBLIC_REPOS).map_err(|e| m(&e))?;
        Ok(table.get(repo_key).map_err(|e| m(&e))?.map(|v| v.value()))
    }

    /// Records (`Some`) or forgets (`None`) that a repository is readable anonymously.
    pub fn set_public(&self, repo_key: &str, at: Option<u64>) -> Result<(), StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_write().map_err(|e| m(&e))?;
        {
            let mut table = txn.open_table(PUBLIC_REPOS).map_err(|e| m(&e))?;
            match at {
                Some(t) => {
                    table.insert(repo_key, t).map_err(|e| m(&e))?;
                }
                None => {
                    table.remove(repo_key).map_err(|e| m(&e))?;
                }
            }
        }
        txn.commit().map_err(|e| m(&e))
    }
}

/// A fill in progress: a temp file being hashed as it is written. Readers of a growing
/// fill share `file()` and read it with positioned reads.
pub struct BlobWriter {
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

    /// Verifies the digest, then makes the content durable and visible. On a mismatch the
    /// temp file is removed (by drop) and nothing becomes visible.
    pub fn finish(mut self) -> Result<(), StoreError> {
        let algorithm = self.expected.algorithm();
        let actual = Digest::from_bytes(algorithm, self.hasher.clone().finish().as_ref());
        if actual != self.expected {
            return Err(StoreError::Mismatch { expected: self.expected.clone(), actual });
        }
        self.file.sync_all().map_err(io_err(&self.tmp))?;
        let dir = self.dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        // Same content under the same name: if another fill got there first, rename simply
        // replaces identical bytes.
        fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        self.finished = true;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
        Ok(())
    }
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
        Digest::from_bytes(Algorithm::Sha256, aws_lc_rs::digest::digest(&SHA256, b).as_ref())
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
            store.set_media_type(&d, "application/vnd.oci.image.manifest.v1+json").unwrap();
        }
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(store.media_type(&d).unwrap().as_deref(), Some("application/vnd.oci.image.manifest.v1+json"));
        assert!(store.put(&sha256(b"a"), b"b").is_err());
    }

    #[test]
    fn tags_and_public_repos_persist() {
        let dir = tempfile::tempdir().unwrap();
        let e = TagEntry { digest: sha256(b"m").to_string(), media_type: "x".into(), checked_at_ms: 7 };
        {
            let store = BlobStore::open(dir.path()).unwrap();
            assert_eq!(store.tag("quay.io/a:latest#").unwrap(), None);
            store.set_tag("quay.io/a:latest#", &e).unwrap();
            store.set_public("quay.io/a", Some(9)).unwrap();
            store.set_public("quay.io/b", Some(9)).unwrap();
            store.set_public("quay.io/b", None).unwrap();
        }
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(store.tag("quay.io/a:latest#").unwrap(), Some(e));
        assert_eq!(store.public_since("quay.io/a").unwrap(), Some(9));
        assert_eq!(store.public_since("quay.io/b").unwrap(), None);
    }
}
