//! The metadata store (`meta.redb`): what the cache knows besides content.
//!
//! Tables, each keyed by one type's one text encoding (`oci::keys`):
//!
//! - `tags_v2`: `TagKey` → the manifest digest and media type per `Accept` variant, with
//!   the time upstream last confirmed it;
//! - `members_v1`: digest → every `RepoKey` upstream has served it under (a digest is
//!   served under a repository only where it belongs, as distribution links blobs);
//! - `public_v2`: `RepoKey` → when upstream last served it without credentials;
//! - `history_v1`: `TagKey` → the digests it resolved to and when (newest last, bounded);
//! - `pins_v1`: `ImageRef` → when it was pinned (its objects are never evicted);
//! - `media_types`, `atimes`: per digest.
//!
//! redb commits are atomic and durable, so a crash loses at most a recent row, and rows
//! are written only after the content they name is in place: a row may point at content
//! that was evicted (it is fetched again), never at content that was never verified.

use redb::{MultimapTableDefinition, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::content::{BlobStore, StoreError};
use crate::oci::{Digest, ImageRef, Reference, RepoKey, TagKey};

pub(super) const MEDIA_TYPES: TableDefinition<&str, &str> = TableDefinition::new("media_types");
/// `TagKey` (`<registry>/<repo>:<tag>`) → JSON `TagRow`.
pub(super) const TAGS: TableDefinition<&str, &str> = TableDefinition::new("tags_v2");
/// `<digest>` → unix milliseconds of the last read (LRU eviction survives restarts).
pub(super) const ATIMES: TableDefinition<&str, u64> = TableDefinition::new("atimes");
/// `RepoKey` → unix milliseconds when upstream last served it without credentials.
pub(super) const PUBLIC_REPOS: TableDefinition<&str, u64> = TableDefinition::new("public_v2");
/// `<digest>` → every `RepoKey` upstream has served it under: a digest is served under a
/// repository only where it is known to belong (as distribution links blobs to
/// repositories). Keyed by digest so eviction drops an object's rows at once.
pub(super) const MEMBERS: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("members_v1");
/// `TagKey` → JSON `[{digest, at_ms}]`: what the tag resolved to, oldest first.
pub(super) const HISTORY: TableDefinition<&str, &str> = TableDefinition::new("history_v1");
/// `ImageRef` (`<registry>/<repo>:<tag>` or `...@<digest>`) → unix ms when pinned.
pub(super) const PINS: TableDefinition<&str, u64> = TableDefinition::new("pins_v1");
/// Most digests remembered per tag in `history_v1`.
pub const MAX_TAG_HISTORY: usize = 20;

/// One entry of a tag's history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TagChange {
    pub digest: Digest,
    /// Unix milliseconds when the tag was first seen resolving to it.
    pub at_ms: u64,
}

/// Written before registries had ports: `<host>/<repo>:<tag>#<accept>` and `<host>/<repo>`.
/// Which port such a row came from cannot be known, so they are dropped on open.
pub(super) const TAGS_V1: TableDefinition<&str, &str> = TableDefinition::new("tags");
pub(super) const PUBLIC_REPOS_V1: TableDefinition<&str, u64> = TableDefinition::new("public_repos");

/// Most `Accept` variants remembered for one tag.
pub const MAX_TAG_VARIANTS: usize = 16;

/// What a tag pointed to, for one `Accept` variant, when last fetched or revalidated.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TagVariant {
    /// The client's `Accept` list, normalised (see `registry_api::manifests::accept_key`).
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
        self.hot_tags.get_or_read(
            key,
            || key.clone(),
            || {
                let k = key.to_string();
                let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
                let txn = self.meta.begin_read().map_err(|e| m(&e))?;
                let table = txn.open_table(TAGS).map_err(|e| m(&e))?;
                let value = table.get(k.as_str()).map_err(|e| m(&e))?;
                // A row that does not parse is treated as absent: it will be refetched.
                Ok(value.and_then(|v| serde_json::from_str(v.value()).ok()))
            },
        )
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
            let mut history = txn.open_table(HISTORY).map_err(|e| m(&e))?;
            let mut changes: Vec<TagChange> = history
                .get(k.as_str())
                .map_err(|e| m(&e))?
                .and_then(|v| serde_json::from_str(v.value()).ok())
                .unwrap_or_default();
            if !changes.iter().any(|c| c.digest == variant.digest) {
                changes.push(TagChange {
                    digest: variant.digest.clone(),
                    at_ms: crate::clock::now_ms(),
                });
                let over = changes.len().saturating_sub(MAX_TAG_HISTORY);
                changes.drain(..over);
                let json = serde_json::to_string(&changes).map_err(|e| m(&e))?;
                history
                    .insert(k.as_str(), json.as_str())
                    .map_err(|e| m(&e))?;
            }
            row.put(variant);
            let json = serde_json::to_string(&row).map_err(|e| m(&e))?;
            table.insert(k.as_str(), json.as_str()).map_err(|e| m(&e))?;
            let mut members = txn.open_multimap_table(MEMBERS).map_err(|e| m(&e))?;
            members
                .insert(digest.as_str(), key.repo.to_string().as_str())
                .map_err(|e| m(&e))?;
        }
        txn.commit().map_err(|e| m(&e))?;
        self.hot_tags.written(key);
        Ok(())
    }

    /// Forgets a tag (every variant).
    pub fn remove_tag(&self, key: &TagKey) -> Result<(), StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_write().map_err(|e| m(&e))?;
        {
            let mut table = txn.open_table(TAGS).map_err(|e| m(&e))?;
            table.remove(key.to_string().as_str()).map_err(|e| m(&e))?;
        }
        txn.commit().map_err(|e| m(&e))?;
        self.hot_tags.written(key);
        Ok(())
    }

    /// The digests `key` resolved to and when, oldest first (the last [`MAX_TAG_HISTORY`]).
    pub fn tag_history(&self, key: &TagKey) -> Result<Vec<TagChange>, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_read().map_err(|e| m(&e))?;
        let table = txn.open_table(HISTORY).map_err(|e| m(&e))?;
        let value = table.get(key.to_string().as_str()).map_err(|e| m(&e))?;
        Ok(value
            .and_then(|v| serde_json::from_str(v.value()).ok())
            .unwrap_or_default())
    }

    /// Pins (or, with `false`, unpins) an image: its objects are never evicted. Whether
    /// that changed anything.
    pub fn set_pin(&self, image: &ImageRef, pinned: bool) -> Result<bool, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let k = image.to_string();
        let txn = self.meta.begin_write().map_err(|e| m(&e))?;
        let changed = {
            let mut table = txn.open_table(PINS).map_err(|e| m(&e))?;
            if pinned {
                table
                    .insert(k.as_str(), crate::clock::now_ms())
                    .map_err(|e| m(&e))?
                    .is_none()
            } else {
                table.remove(k.as_str()).map_err(|e| m(&e))?.is_some()
            }
        };
        txn.commit().map_err(|e| m(&e))?;
        Ok(changed)
    }

    /// Every pinned image.
    pub fn pins(&self) -> Result<Vec<ImageRef>, StoreError> {
        let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
        let txn = self.meta.begin_read().map_err(|e| m(&e))?;
        let table = txn.open_table(PINS).map_err(|e| m(&e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| m(&e))? {
            let (k, _) = row.map_err(|e| m(&e))?;
            if let Ok(r) = k.value().parse() {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The objects of `image`: its manifest (every variant of a tag), child manifests,
    /// configs and layers, as far as the stored manifests tell.
    pub fn image_objects(
        &self,
        image: &ImageRef,
    ) -> Result<std::collections::HashSet<Digest>, StoreError> {
        let roots: Vec<Digest> = match (&image.reference, image.tag_key()) {
            (Reference::Digest(d), _) => vec![d.clone()],
            (_, Some(key)) => self
                .tag(&key)?
                .map(|row| row.variants.into_iter().map(|v| v.digest).collect())
                .unwrap_or_default(),
            (_, None) => Vec::new(),
        };
        self.walk_image(roots)
    }

    /// Every digest reachable from `roots` through stored manifests and indexes (each
    /// once, at most 10,000), whether or not the cache still holds it.
    pub fn walk_image(
        &self,
        roots: Vec<Digest>,
    ) -> Result<std::collections::HashSet<Digest>, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut queue = roots;
        while let Some(d) = queue.pop() {
            if seen.len() >= 10_000 || !seen.insert(d.clone()) {
                continue;
            }
            if self.index.get(&d).is_some() && self.media_type(&d)?.is_some() {
                if let Ok(bytes) = std::fs::read(self.path(&d)) {
                    queue.extend(references(&bytes));
                }
            }
        }
        Ok(seen)
    }

    /// Every object of every pinned image.
    pub fn pinned_objects(&self) -> Result<std::collections::HashSet<Digest>, StoreError> {
        let mut all = std::collections::HashSet::new();
        for image in self.pins()? {
            all.extend(self.image_objects(&image)?);
        }
        Ok(all)
    }

    /// When upstream last served `repo` without credentials, if it ever did.
    pub fn public_since(&self, repo: &RepoKey) -> Result<Option<u64>, StoreError> {
        self.hot_public.get_or_read(
            repo,
            || repo.clone(),
            || {
                let k = repo.to_string();
                let m = |e: &dyn std::fmt::Display| StoreError::Meta(e.to_string());
                let txn = self.meta.begin_read().map_err(|e| m(&e))?;
                let table = txn.open_table(PUBLIC_REPOS).map_err(|e| m(&e))?;
                let value = table.get(k.as_str()).map_err(|e| m(&e))?;
                Ok(value.map(|v| v.value()))
            },
        )
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
        txn.commit().map_err(|e| m(&e))?;
        self.hot_public.written(repo);
        Ok(())
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
        let mut txn = self.meta.begin_write().map_err(|e| m(&e))?;
        // No fsync of its own (it runs on a request's path): a crash may lose this row, which
        // costs one upstream HEAD later; it is made durable with the next durable commit.
        txn.set_durability(redb::Durability::Eventual);
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

/// Digests a manifest (or index) references: its config, layers and child manifests.
/// Anything that is not such JSON, and descriptors whose digest does not parse, give
/// nothing. Public for the fuzz targets (`fuzz/`).
pub fn references(bytes: &[u8]) -> Vec<Digest> {
    #[derive(serde::Deserialize)]
    struct Desc {
        digest: String,
    }
    #[derive(serde::Deserialize)]
    struct Manifest {
        #[serde(default)]
        config: Option<Desc>,
        #[serde(default)]
        layers: Vec<Desc>,
        #[serde(default)]
        manifests: Vec<Desc>,
    }
    let Ok(m) = serde_json::from_slice::<Manifest>(bytes) else {
        return Vec::new();
    };
    m.config
        .into_iter()
        .chain(m.layers)
        .chain(m.manifests)
        .filter_map(|d| d.digest.parse().ok())
        .collect()
}

/// Deletes the tables of the port-less format, returning how many rows each held.
pub(super) fn drop_portless_rows(txn: &redb::WriteTransaction) -> Result<(u64, u64), StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn sha256(b: &[u8]) -> Digest {
        Digest::from_bytes(
            Algorithm::Sha256,
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref(),
        )
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
