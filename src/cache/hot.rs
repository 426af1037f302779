//! Hot rows kept in memory in front of the metadata database and the manifest files.
//!
//! A manifest `HEAD` hit used to cost three redb read transactions (tag, media type, public
//! mark), an `open` and an `fstat`: a quarter of its CPU in a profile of the `HEAD` bench
//! (bench/README.md, `BENCH_PERF_HEAD`). The store keeps
//! what those return here, bounded, and every write to what is kept goes through
//! [`Hot::written`] after it commits. A miss reads the truth and keeps it only when no
//! write happened meanwhile, so a row read before a write can never outlive it.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub(super) struct Hot<K, V> {
    rows: moka::sync::Cache<K, V>,
    /// Bumped by every write; a miss that saw it move keeps nothing.
    generation: AtomicU64,
    /// Makes "generation unchanged, keep the row" one step against "bump, drop the row".
    keep: Mutex<()>,
}

impl<K, V> Hot<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// At most `max` weight units, each row weighing `weigh(key, value)`.
    pub(super) fn new(max: u64, weigh: fn(&K, &V) -> u32) -> Hot<K, V> {
        Hot {
            rows: moka::sync::Cache::builder()
                .max_capacity(max)
                .weigher(weigh)
                .build(),
            generation: AtomicU64::new(0),
            keep: Mutex::new(()),
        }
    }

    /// The kept row, or `read()` (the truth), kept when no write raced it.
    pub(super) fn get_or_read<Q, E>(
        &self,
        key: &Q,
        owned: impl FnOnce() -> K,
        read: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(v) = self.rows.get(key) {
            return Ok(v);
        }
        let seen = self.generation.load(Ordering::SeqCst);
        let v = read()?;
        let _keep = self.keep.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::SeqCst) == seen {
            self.rows.insert(owned(), v.clone());
        }
        Ok(v)
    }

    /// After a write to `key` has committed: the kept row (if any) goes.
    pub(super) fn written<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let _keep = self.keep.lock().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.rows.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_drops_the_row_and_a_racing_read_keeps_nothing() {
        let hot: Hot<String, u32> = Hot::new(100, |_, _| 1);
        let v: Result<u32, ()> = hot.get_or_read("a", || "a".into(), || Ok(1));
        assert_eq!(v, Ok(1));
        // Kept: the truth is not read again.
        let v: Result<u32, ()> = hot.get_or_read("a", || "a".into(), || panic!("read again"));
        assert_eq!(v, Ok(1));
        hot.written("a");
        let v: Result<u32, ()> = hot.get_or_read("a", || "a".into(), || Ok(2));
        assert_eq!(v, Ok(2));
        // A read that a write overtook returns what it read but does not keep it.
        hot.written("b");
        let v: Result<u32, ()> = hot.get_or_read(
            "b",
            || "b".into(),
            || {
                hot.written("b");
                Ok(7)
            },
        );
        assert_eq!(v, Ok(7));
        let v: Result<u32, ()> = hot.get_or_read("b", || "b".into(), || Ok(8));
        assert_eq!(v, Ok(8), "the overtaken read must not have been kept");
        // Errors are not kept either.
        let e: Result<u32, &str> = hot.get_or_read("c", || "c".into(), || Err("down"));
        assert_eq!(e, Err("down"));
        let v: Result<u32, &str> = hot.get_or_read("c", || "c".into(), || Ok(3));
        assert_eq!(v, Ok(3));
    }
}
