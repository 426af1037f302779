//! Writing content: a temp file hashed while it is written, verified, `sync_all`,
//! renamed into place, directory fsynced. A writer dropped before `finish` leaves nothing.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use aws_lc_rs::digest::Context;

use super::content::{io_err, BlobStore, StoreError};
use crate::oci::Digest;

/// A fill in progress: a temp file being hashed as it is written. Readers of a growing
/// fill share `file()` and read it with positioned reads.
pub struct BlobWriter {
    pub(super) store: Arc<BlobStore>,
    pub(super) file: Arc<File>,
    pub(super) tmp: PathBuf,
    pub(super) dest: PathBuf,
    pub(super) expected: Digest,
    pub(super) hasher: Context,
    pub(super) written: u64,
    pub(super) finished: bool,
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

    /// Gives up on storing: the temp file leaves the cache now (open handles go on reading
    /// it) and the hash of what was written goes on with the caller.
    pub fn abandon(self) -> Context {
        self.hasher.clone()
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
