//! Who may read cached content: the one access decision.
//!
//! The cache is shared by digest across registries, repositories and clients, so every
//! cached byte is served only with an [`Authorized`] value, and only [`Access::authorize`]
//! (or an upstream success seen by [`Access::granted_by_upstream`]) makes one. It answers
//! "may this client read this object in this repository of this registry?" (a
//! [`RepoKey`] carries the registry: scheme, host and port), in two parts:
//!
//! - **the object belongs to the repository**: upstream has served this digest under this
//!   repository (membership, persisted in the metadata store), as distribution links
//!   blobs to repositories. A private layer's digest asked for under a public repository is
//!   not a member there, so the client is sent upstream, which answers 404;
//! - **the client may read the repository**: a recent upstream success for the same
//!   (repository, credential), remembered for `[cache] auth_ttl` and keyed by a SHA-256 of
//!   the credential; or the repository was served by upstream without any credentials (a
//!   background probe; only a `2xx` counts) within `[cache] public_ttl`.
//!
//! Otherwise upstream is asked now (a `HEAD` of the object with the client's credentials,
//! by the caller's `ask`), which proves both. When upstream cannot answer (unreachable,
//! `5xx`, `429`, or `[cache] offline = true`), a member object of a repository once seen
//! public stays servable; nothing else is. The fresh, stale and offline paths all come
//! here, so there is exactly one set of rules.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::cache::BlobStore;
use crate::clock::now_ms;
use crate::oci::{Digest, RepoKey};
use crate::settings::AuthCheck;

/// Proof that one object may go to the client that asked. The serving functions take it;
/// nothing outside this module can make one.
#[derive(Debug)]
pub struct Authorized {
    digest: Digest,
}

impl Authorized {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

/// What upstream said to the question "may this client read this object here?".
pub struct Reply {
    pub status: StatusCode,
    /// `WWW-Authenticate`, `Retry-After` and the like, passed on with a refusal.
    pub headers: HeaderMap,
}

/// Why cached content is not served.
#[derive(Debug)]
pub enum Refusal {
    /// Upstream said no (401, 403, 404) or asked the client to wait (429): its answer,
    /// passed on.
    Upstream {
        status: StatusCode,
        headers: HeaderMap,
    },
    /// Upstream cannot be asked, and nothing known allows it.
    Unavailable(&'static str),
}

/// The question to upstream, not yet asked (a future is polled only when needed). Boxed:
/// it borrows the caller's upstream and registry, which generic futures cannot carry
/// through `Send` bounds on this compiler.
pub type Ask<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, String>> + Send + 'a>>;

/// Whether the caller may ask upstream now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamNow {
    /// Ask upstream if nothing known decides.
    Ask,
    /// Upstream just failed for this request (a stale revalidation): decide on what is known.
    Failing,
}

pub struct Access {
    store: Arc<BlobStore>,
    /// Memberships already found in the store: a fact that stays true (upstream served
    /// this digest here), so a hit needs no metadata read for it.
    known_members: moka::sync::Cache<(RepoKey, Digest), ()>,
    recent: moka::sync::Cache<(RepoKey, [u8; 32]), ()>,
    probed: moka::sync::Cache<RepoKey, ()>,
    public_ttl: Duration,
    check: AuthCheck,
    offline: bool,
}

impl Access {
    pub fn new(
        store: Arc<BlobStore>,
        check: AuthCheck,
        offline: bool,
        auth_ttl: Duration,
        public_ttl: Duration,
    ) -> Access {
        Access {
            store,
            known_members: moka::sync::Cache::builder().max_capacity(100_000).build(),
            recent: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(auth_ttl)
                .build(),
            probed: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(public_ttl)
                .build(),
            public_ttl,
            check,
            offline,
        }
    }

    /// The decision for a cached `digest` asked for under `repo` by a client whose
    /// credential hashes to `credential`. `ask` makes the question for upstream (a `HEAD`
    /// of the object with the client's credentials); it is called only when nothing known
    /// decides, so a hit builds no request.
    pub async fn authorize<'a>(
        &self,
        repo: &RepoKey,
        digest: &Digest,
        credential: [u8; 32],
        now: UpstreamNow,
        ask: impl FnOnce() -> Ask<'a>,
    ) -> Result<Authorized, Refusal> {
        let yes = || {
            Ok(Authorized {
                digest: digest.clone(),
            })
        };
        if self.check == AuthCheck::None {
            return yes();
        }
        let member = self.is_member(repo, digest);
        let public_since = if member {
            self.store.public_since(repo).unwrap_or(None)
        } else {
            None
        };
        if member {
            if self.recent.contains_key(&(repo.clone(), credential)) {
                return yes();
            }
            if self.public_fresh(public_since) {
                return yes();
            }
        }
        // Upstream cannot be asked: only what is known may allow it.
        let known_public = member && public_since.is_some();
        if self.offline || now == UpstreamNow::Failing {
            if known_public {
                return yes();
            }
            return Err(Refusal::Unavailable(if !member {
                "this object is not known to belong to this repository, and upstream cannot be asked"
            } else {
                "this repository is not known to be public, and upstream cannot be asked"
            }));
        }
        match ask().await {
            Ok(a) if a.status.is_success() => {
                self.grant(repo, credential);
                self.remember_member(repo, digest);
                yes()
            }
            Ok(a) if matches!(a.status.as_u16(), 401 | 403 | 404) => {
                tracing::info!(repo = %repo, %digest, status = a.status.as_u16(), "cached content refused: upstream denies this client");
                Err(Refusal::Upstream {
                    status: a.status,
                    headers: a.headers,
                })
            }
            other => {
                let why = match &other {
                    Ok(a) => format!("upstream answered {}", a.status),
                    Err(e) => e.clone(),
                };
                if known_public {
                    tracing::info!(repo = %repo, %why, "upstream unavailable; serving a public repository from the cache");
                    return yes();
                }
                tracing::info!(repo = %repo, %why, "upstream unavailable and access not known; refusing cached content");
                match other {
                    Ok(a) if a.status == StatusCode::TOO_MANY_REQUESTS => Err(Refusal::Upstream {
                        status: a.status,
                        headers: a.headers,
                    }),
                    _ => Err(Refusal::Unavailable(
                        "upstream registry unavailable; cannot confirm access to this repository",
                    )),
                }
            }
        }
    }

    /// Upstream just answered this client's own request for `digest` under `repo` with
    /// `status`. A `2xx` means the client may read it and that it belongs there: remembered,
    /// and the answer is an authorization for what upstream sent.
    pub fn granted_by_upstream(
        &self,
        repo: &RepoKey,
        digest: &Digest,
        credential: [u8; 32],
        status: StatusCode,
    ) -> Option<Authorized> {
        if !status.is_success() {
            return None;
        }
        self.grant(repo, credential);
        self.remember_member(repo, digest);
        Some(Authorized {
            digest: digest.clone(),
        })
    }

    /// The bytes upstream is sending in answer to this client's own request for `digest`:
    /// served as they arrive, never completed unless they verify. Grants nothing (that
    /// waits for the verification: a redirect to a login page also answers 200).
    pub fn upstream_answer(&self, digest: &Digest) -> Authorized {
        Authorized {
            digest: digest.clone(),
        }
    }

    /// Whether `repo` was once seen public (what lets its members be served while upstream
    /// cannot be asked).
    pub fn known_public(&self, repo: &RepoKey) -> bool {
        self.store.public_since(repo).ok().flatten().is_some()
    }

    /// Upstream let `credential` read `repo` just now (a `2xx`).
    pub fn grant(&self, repo: &RepoKey, credential: [u8; 32]) {
        self.recent.insert((repo.clone(), credential), ());
    }

    fn is_member(&self, repo: &RepoKey, digest: &Digest) -> bool {
        let key = (repo.clone(), digest.clone());
        if self.known_members.contains_key(&key) {
            return true;
        }
        let member = self.store.is_member(repo, digest).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "membership lookup failed; asking upstream");
            false
        });
        if member {
            self.known_members.insert(key, ());
        }
        member
    }

    fn remember_member(&self, repo: &RepoKey, digest: &Digest) {
        let key = (repo.clone(), digest.clone());
        if self.known_members.contains_key(&key) {
            return;
        }
        match self.store.add_member(repo, digest) {
            Ok(()) => self.known_members.insert(key, ()),
            Err(e) => tracing::warn!(error = %e, "repository membership not recorded"),
        }
    }

    /// A public-since timestamp that is still fresh enough to skip upstream checks.
    fn public_fresh(&self, since_ms: Option<u64>) -> bool {
        since_ms.is_some_and(|t| now_ms().saturating_sub(t) < self.public_ttl.as_millis() as u64)
    }

    /// True once per `public_ttl` per repository (and never with `auth_check = "none"`
    /// or offline, where upstream is not asked): whether to run an anonymous probe now.
    pub fn should_probe(&self, repo: &RepoKey) -> bool {
        if self.check == AuthCheck::None || self.offline {
            return false;
        }
        let mut first = false;
        self.probed.entry(repo.clone()).or_insert_with(|| {
            first = true;
        });
        first
    }

    /// What an anonymous probe of `repo` got. Only a `2xx` makes a repository public (a
    /// redirect may be a login page); 401/403/404 make it private again; anything else
    /// says nothing.
    pub fn record_probe(&self, repo: &RepoKey, status: StatusCode) {
        let public = match status.as_u16() {
            200..=299 => Some(now_ms()),
            401 | 403 | 404 => None,
            _ => return,
        };
        tracing::debug!(repo = %repo, public = public.is_some(), status = status.as_u16(), "anonymous access probe");
        if let Err(e) = self.store.set_public(repo, public) {
            tracing::warn!(error = %e, "public mark not recorded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn repo(s: &str) -> RepoKey {
        s.parse().unwrap()
    }

    fn d(n: u8) -> Digest {
        Digest::from_bytes(Algorithm::Sha256, &[n; 32])
    }

    fn access(dir: &std::path::Path, offline: bool) -> Access {
        let store = BlobStore::open(dir).unwrap();
        Access::new(
            store,
            AuthCheck::Upstream,
            offline,
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
    }

    async fn decide(
        a: &Access,
        r: &RepoKey,
        dg: &Digest,
        cred: u8,
        answer: Option<u16>,
    ) -> Result<Authorized, Refusal> {
        a.authorize(r, dg, [cred; 32], UpstreamNow::Ask, move || {
            Box::pin(async move {
                match answer {
                    Some(s) => Ok(Reply {
                        status: StatusCode::from_u16(s).unwrap(),
                        headers: HeaderMap::new(),
                    }),
                    None => Err("unreachable".to_string()),
                }
            })
        })
        .await
    }

    #[tokio::test]
    async fn grants_are_per_repository_registry_and_credential() {
        let dir = tempfile::tempdir().unwrap();
        let a = access(dir.path(), false);
        let private = repo("quay.io/team/private");
        assert!(a
            .granted_by_upstream(&private, &d(1), [1; 32], StatusCode::OK)
            .is_some());
        assert!(a
            .granted_by_upstream(&private, &d(1), [1; 32], StatusCode::FOUND)
            .is_none());
        // Known member, granted credential: no upstream question.
        assert!(decide(&a, &private, &d(1), 1, Some(500)).await.is_ok());
        // Another credential, another port, another scheme: upstream decides.
        assert!(decide(&a, &private, &d(1), 2, Some(401)).await.is_err());
        assert!(
            decide(&a, &repo("quay.io:5000/team/private"), &d(1), 1, Some(404))
                .await
                .is_err()
        );
        assert!(decide(
            &a,
            &repo("http://quay.io/team/private"),
            &d(1),
            1,
            Some(404)
        )
        .await
        .is_err());
    }

    #[tokio::test]
    async fn a_digest_is_served_only_under_a_repository_it_belongs_to() {
        let dir = tempfile::tempdir().unwrap();
        let a = access(dir.path(), false);
        let public = repo("quay.io/library/pub");
        a.granted_by_upstream(&public, &d(1), [0; 32], StatusCode::OK);
        a.record_probe(&public, StatusCode::OK);
        assert!(decide(&a, &public, &d(1), 0, None).await.is_ok());
        // d(2) is a private layer never seen in library/pub: upstream is asked, says 404.
        match decide(&a, &public, &d(2), 0, Some(404)).await {
            Err(Refusal::Upstream { status, .. }) => assert_eq!(status, 404),
            other => panic!("{other:?}"),
        }
        // ...and with upstream unreachable it is refused too, public repository or not.
        assert!(matches!(
            decide(&a, &public, &d(2), 0, None).await,
            Err(Refusal::Unavailable(_))
        ));
        // Offline: the same.
        drop(a);
        let a = access(dir.path(), true);
        assert!(decide(&a, &public, &d(1), 0, None).await.is_ok());
        assert!(decide(&a, &public, &d(2), 0, Some(200)).await.is_err());
    }

    #[tokio::test]
    async fn only_a_2xx_makes_a_repository_public() {
        let dir = tempfile::tempdir().unwrap();
        let a = access(dir.path(), false);
        let r = repo("quay.io:5000/team/private");
        a.granted_by_upstream(&r, &d(1), [1; 32], StatusCode::OK);
        a.record_probe(&r, StatusCode::FOUND);
        assert!(
            decide(&a, &r, &d(1), 0, Some(401)).await.is_err(),
            "a 302 probe made it public"
        );
        assert!(
            decide(&a, &r, &d(1), 0, None).await.is_err(),
            "upstream down: not known public"
        );
        a.record_probe(&r, StatusCode::OK);
        assert!(decide(&a, &r, &d(1), 0, Some(401)).await.is_ok());
        a.record_probe(&r, StatusCode::UNAUTHORIZED);
        assert!(decide(&a, &r, &d(1), 0, Some(401)).await.is_err());
        assert!(a.should_probe(&r) && !a.should_probe(&r));
    }
}
