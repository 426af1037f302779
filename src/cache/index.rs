//! The in-memory index of what the cache holds: size and last access per digest.
//!
//! Built at start-up from a scan of `blobs/` (the disk is the truth) joined with the last
//! access times persisted in the metadata store, then kept current by the store (inserts
//! on verified writes, touches on reads). Eviction policy lives here, separate from the
//! storage mechanics: least recently used first, down to a low watermark.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::clock::now_ms;
use crate::oci::Digest;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub size: u64,
    pub atime_ms: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Digest, Entry>,
    total: u64,
    /// Entries whose access time changed since the last flush.
    dirty: HashSet<Digest>,
}

#[derive(Default)]
pub struct Index {
    inner: Mutex<Inner>,
}

/// Access times are persisted at this granularity; touching more often is free.
const TOUCH_GRANULARITY_MS: u64 = 1000;

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("index lock")
    }

    /// Adds (or replaces) an entry; `atime_ms` of `None` means now.
    pub fn insert(&self, digest: Digest, size: u64, atime_ms: Option<u64>) {
        let mut i = self.lock();
        let entry = Entry {
            size,
            atime_ms: atime_ms.unwrap_or_else(now_ms),
        };
        if let Some(old) = i.entries.insert(digest.clone(), entry) {
            i.total -= old.size;
        }
        i.total += size;
        if atime_ms.is_none() {
            i.dirty.insert(digest);
        }
    }

    pub fn touch(&self, digest: &Digest) {
        let now = now_ms();
        let mut i = self.lock();
        let changed = match i.entries.get_mut(digest) {
            Some(e) if now.saturating_sub(e.atime_ms) >= TOUCH_GRANULARITY_MS => {
                e.atime_ms = now;
                true
            }
            _ => false,
        };
        if changed {
            i.dirty.insert(digest.clone());
        }
    }

    pub fn remove(&self, digest: &Digest) -> Option<Entry> {
        let mut i = self.lock();
        let e = i.entries.remove(digest)?;
        i.total -= e.size;
        i.dirty.remove(digest);
        Some(e)
    }

    pub fn get(&self, digest: &Digest) -> Option<Entry> {
        self.lock().entries.get(digest).copied()
    }

    pub fn total(&self) -> u64 {
        self.lock().total
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<(Digest, Entry)> {
        self.lock()
            .entries
            .iter()
            .map(|(d, e)| (d.clone(), *e))
            .collect()
    }

    /// Access times changed since the last call.
    pub fn take_dirty(&self) -> Vec<(Digest, u64)> {
        let mut i = self.lock();
        let dirty = std::mem::take(&mut i.dirty);
        dirty
            .into_iter()
            .filter_map(|d| i.entries.get(&d).map(|e| (d.clone(), e.atime_ms)))
            .collect()
    }

    /// Least recently used entries whose removal brings the total to `target` or below,
    /// plus every entry last used before `older_than_ms` when given.
    pub fn victims(&self, target: u64, older_than_ms: Option<u64>) -> Vec<(Digest, Entry)> {
        self.victims_except(target, older_than_ms, &std::collections::HashSet::new())
    }

    /// [`Index::victims`], never choosing an object in `keep`.
    pub fn victims_except(
        &self,
        target: u64,
        older_than_ms: Option<u64>,
        keep: &std::collections::HashSet<Digest>,
    ) -> Vec<(Digest, Entry)> {
        let i = self.lock();
        let mut all: Vec<_> = i
            .entries
            .iter()
            .filter(|(d, _)| !keep.contains(*d))
            .map(|(d, e)| (d.clone(), *e))
            .collect();
        all.sort_by_key(|(d, e)| (e.atime_ms, d.clone()));
        let mut total = i.total;
        let mut out = Vec::new();
        for (d, e) in all {
            let old = older_than_ms.is_some_and(|cut| e.atime_ms < cut);
            if total <= target && !old {
                if older_than_ms.is_none() {
                    break;
                }
                continue;
            }
            total -= e.size;
            out.push((d, e));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn d(n: u8) -> Digest {
        Digest::from_bytes(Algorithm::Sha256, &[n; 32])
    }

    #[test]
    fn totals_follow_inserts_and_removals() {
        let i = Index::default();
        i.insert(d(1), 10, Some(1));
        i.insert(d(2), 20, Some(2));
        i.insert(d(1), 15, Some(3));
        assert_eq!(i.total(), 35);
        assert_eq!(i.remove(&d(2)).unwrap().size, 20);
        assert_eq!(i.total(), 15);
        assert_eq!(i.len(), 1);
    }

    #[test]
    fn victims_are_least_recently_used_first() {
        let i = Index::default();
        i.insert(d(1), 10, Some(300));
        i.insert(d(2), 10, Some(100));
        i.insert(d(3), 10, Some(200));
        let v: Vec<_> = i.victims(15, None).into_iter().map(|(d, _)| d).collect();
        assert_eq!(v, vec![d(2), d(3)]);
        assert!(i.victims(30, None).is_empty());
        let v: Vec<_> = i
            .victims(u64::MAX, Some(250))
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(v, vec![d(2), d(3)]);
    }

    #[test]
    fn touches_mark_entries_dirty_for_persistence() {
        let i = Index::default();
        i.insert(d(1), 1, Some(0));
        assert!(i.take_dirty().is_empty());
        i.touch(&d(1));
        let dirty = i.take_dirty();
        assert_eq!(dirty.len(), 1);
        assert!(dirty[0].1 > 0);
        assert!(i.take_dirty().is_empty());
    }
}
