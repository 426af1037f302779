//! Who may read cached content.
//!
//! The cache is shared by digest across registries and clients, so a hit must not hand a
//! private layer to a client that upstream would refuse. Two kinds of evidence allow a hit
//! without asking upstream again:
//!
//! - a recent upstream success for the same (registry, repository, credential), remembered
//!   for `[cache] auth_ttl` and keyed by a SHA-256 of the credential, never the credential;
//! - the repository was served by upstream *without any credentials* (a background probe),
//!   within `[cache] public_ttl`. That fact is persisted, so when upstream is unreachable
//!   (or `offline = true`) public repositories stay servable and private ones do not.
//!
//! Otherwise the caller asks upstream (`HEAD` with the client's credentials) and records
//! the answer here.

use std::time::Duration;

use crate::oci::RepoName;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The key of a repository across registries: `<registry>/<repo>`.
pub fn repo_key(registry: &str, repo: &RepoName) -> String {
    format!("{registry}/{repo}")
}

pub struct Access {
    recent: moka::sync::Cache<(String, [u8; 32]), ()>,
    probed: moka::sync::Cache<String, ()>,
    public_ttl: Duration,
}

impl Access {
    pub fn new(auth_ttl: Duration, public_ttl: Duration) -> Access {
        Access {
            recent: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(auth_ttl)
                .build(),
            probed: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(public_ttl)
                .build(),
            public_ttl,
        }
    }

    /// Upstream let `credential` read `repo_key` just now.
    pub fn grant(&self, repo_key: &str, credential: [u8; 32]) {
        self.recent.insert((repo_key.to_owned(), credential), ());
    }

    pub fn granted(&self, repo_key: &str, credential: [u8; 32]) -> bool {
        self.recent.contains_key(&(repo_key.to_owned(), credential))
    }

    /// A public-since timestamp that is still fresh enough to skip upstream checks.
    pub fn public_fresh(&self, since_ms: Option<u64>) -> bool {
        since_ms.is_some_and(|t| now_ms().saturating_sub(t) < self.public_ttl.as_millis() as u64)
    }

    /// True once per `public_ttl` per repository: whether to run an anonymous probe now.
    pub fn should_probe(&self, repo_key: &str) -> bool {
        let mut first = false;
        self.probed.entry(repo_key.to_owned()).or_insert_with(|| {
            first = true;
        });
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_per_repository_and_credential() {
        let a = Access::new(Duration::from_secs(60), Duration::from_secs(60));
        a.grant("quay.io/private", [1; 32]);
        assert!(a.granted("quay.io/private", [1; 32]));
        assert!(!a.granted("quay.io/private", [2; 32]));
        assert!(!a.granted("quay.io/other", [1; 32]));
        assert!(!a.granted("ghcr.io/private", [1; 32]));
    }

    #[test]
    fn public_knowledge_ages() {
        let a = Access::new(Duration::from_secs(60), Duration::from_secs(60));
        assert!(a.public_fresh(Some(now_ms())));
        assert!(!a.public_fresh(Some(now_ms() - 61_000)));
        assert!(!a.public_fresh(None));
        assert!(a.should_probe("quay.io/x"));
        assert!(!a.should_probe("quay.io/x"));
    }
}
