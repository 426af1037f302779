//! The registry API: one [`RegistryApi::serve`] per request, given the registry and the way
//! in ([`Target`]), whichever listener the request came through.
//!
//! `serve` classifies the request (`oci::Route`) and picks one path: blobs by digest
//! ([`blobs`]: disk hit, or a coalesced streaming fill), manifests by digest and by tag
//! ([`manifests`]: buffered, verified, stored with their media type; tags with a TTL and
//! `HEAD` revalidation, stale on upstream failure), and everything else forwarded
//! ([`pass_through`]). Errors become registry JSON in [`errors`].
//!
//! Invariant: every cached byte leaves with an `access::Authorized`, which only the access
//! decision makes; every response gets one outcome, `X-Cache` and one access-log line.

pub mod blobs;
pub mod errors;
pub mod manifests;
pub mod pass_through;
pub mod prefetch;
pub mod quota;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use http::header::{ACCEPT, ACCEPT_RANGES, CONTENT_RANGE, CONTENT_TYPE, ETAG};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, StreamBody};
use tokio_util::task::TaskTracker;

use crate::access::{probe, Access, Authorized, Refusal, UpstreamNow};
use crate::cache::fill::file_stream;
use crate::cache::{Cache, TagVariant};
use crate::http_util::{
    empty, full, head_without_body, set_len, strip_hop_by_hop, Body, DOCKER_CONTENT_DIGEST, X_CACHE,
};
use crate::oci::{Digest, PathRepo, Reference, Registry, RepoKey, RepoName, Route, TagKey};
pub use crate::settings::{RepoFilter, TagTtl};
use crate::telemetry::{CacheStatus, LogLine, Logged, Metrics};
use crate::upstream::token_auth::{self, credential_id, Account, Answer};
use crate::upstream::{Upstream, UpstreamError};
pub use errors::{registry_error, ServeError};

/// The upstream a tunnel (or listener) serves.
#[derive(Clone, Debug)]
pub struct Target {
    /// Scheme, host and port: everything cached or granted for this target is keyed by it.
    pub registry: Registry,
    /// A registry's auth host (token service): everything is forwarded.
    pub auth_host: bool,
    /// Clients bring no upstream credentials (the mirror listener; a request holding
    /// Stowage's placeholder token), so Stowage answers upstream challenges itself (its
    /// account, or anonymously).
    pub answers_challenges: bool,
    /// An account for this request only (`stowage prefetch --creds`): Stowage answers
    /// upstream challenges with it. The request's `Authorization` is then its stand-in for
    /// access decisions (what the cache grants is granted to that credential, not to
    /// anonymous clients) and never goes upstream as it is.
    pub account: Option<Arc<Account>>,
}
impl Target {
    fn uri(&self, path_and_query: &str) -> Result<Uri, ServeError> {
        self.registry.uri(path_and_query).map_err(|_| {
            ServeError::Upstream(crate::upstream::UpstreamError::BadUri(
                path_and_query.chars().take(100).collect(),
            ))
        })
    }

    /// `repo` of this target's registry.
    pub fn repo(&self, repo: &RepoName) -> RepoKey {
        RepoKey::new(self.registry.clone(), repo.clone())
    }
}

/// Everything the registry API uses, built once by the composition root.
pub struct RegistryApi {
    pub cache: Arc<Cache>,
    pub upstream: Arc<Upstream>,
    pub access: Arc<Access>,
    pub metrics: Arc<Metrics>,
    pub accounts: Accounts,
    pub rules: Rules,
    /// Fills and probes run here, so shutdown waits for them.
    pub tasks: TaskTracker,
    /// The shared multi-threaded runtime this was built on: background work runs there, not
    /// on the connection thread that asked for it (`ingress::workers`).
    background: Option<tokio::runtime::Handle>,
    /// (repository, manifest digest) → tag rows waiting for that manifest to be stored
    /// (tags resolved with `HEAD`; see `manifests::remember_tag_head`).
    pending_tags: moka::sync::Cache<(RepoKey, Digest), Vec<(TagKey, TagVariant)>>,
    /// Bounds the manifest bytes fills hold in memory (`manifests::manifest_budget`).
    manifest_budget: Arc<tokio::sync::Semaphore>,
    /// Manifests upstream answered `404` for, per (repository, reference, credential), for
    /// `[cache] negative_ttl`.
    negative: moka::sync::Cache<(RepoKey, String, [u8; 32]), ()>,
    /// Accounts whose pulls left are below `[upstream] quota_reserve` (`quota`).
    pub quota: quota::QuotaGuard,
    /// Revalidation `HEAD`s in flight (`manifests::revalidate`).
    revalidations: moka::future::Cache<manifests::RevalidationKey, manifests::Revalidation>,
}

/// What the operator decided about requests, parsed once by `settings`.
pub struct Rules {
    pub tag_ttl: TagTtl,
    /// `[cache] negative_ttl` (zero: upstream `404`s are not remembered).
    pub negative_ttl: std::time::Duration,
    /// `[[registry]] allow` / `deny`, for the registries that have them.
    pub filters: HashMap<Registry, RepoFilter>,
    /// `[upstream] quota_reserve` as a share (0.1 for `10%`; 0: no guard).
    pub quota_reserve: f64,
}

/// Configured upstream accounts, by the exact registry (scheme, host, port) they are for,
/// and which registries send clients to which configured auth host.
#[derive(Default)]
pub struct Accounts {
    /// Auth host origin → the registries whose configuration names it (`auth_hosts`).
    pub auth_hosts: HashMap<Registry, Vec<Registry>>,
    /// Registry → account used for clients without credentials of their own.
    pub credentials: HashMap<Registry, Account>,
    /// Auth host origin → account added to clients' anonymous token requests.
    pub inject: HashMap<Registry, Account>,
}

impl RegistryApi {
    /// Runs `work` (a fill, a probe, a prefetch) on the shared runtime, tracked by `tasks`:
    /// its blocking file work uses `block_in_place` there, and a connection thread is never
    /// held by a transfer another client started.
    pub fn spawn_background<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match &self.background {
            Some(h) => self.tasks.spawn_on(work, h),
            None => self.tasks.spawn(work),
        };
    }

    pub fn new(
        cache: Arc<Cache>,
        upstream: Arc<Upstream>,
        access: Arc<Access>,
        metrics: Arc<Metrics>,
        accounts: Accounts,
        rules: Rules,
        tasks: TaskTracker,
    ) -> RegistryApi {
        let negative = moka::sync::Cache::builder()
            .support_invalidation_closures()
            .max_capacity(if rules.negative_ttl.is_zero() {
                0
            } else {
                10_000
            })
            .time_to_live(rules.negative_ttl.max(std::time::Duration::from_millis(1)))
            .build();
        RegistryApi {
            quota: quota::QuotaGuard::new(rules.quota_reserve, metrics.clone()),
            negative,
            revalidations: moka::future::Cache::builder().max_capacity(10_000).build(),
            manifest_budget: manifests::manifest_budget(cache.limits.max_manifest_size),
            cache,
            upstream,
            access,
            metrics,
            accounts,
            rules,
            tasks,
            background: tokio::runtime::Handle::try_current().ok(),
            pending_tags: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(manifests::PENDING_TAG_TTL)
                .build(),
        }
    }

    /// How Stowage answers upstream challenges for clients without credentials of their
    /// own: with the registry's configured account if any; else anonymously for mirror
    /// clients (who cannot log in upstream), and not at all for proxy clients (they do
    /// their own token dance).
    pub fn answer<'a>(&'a self, target: &'a Target) -> Answer<'a> {
        if let Some(a) = &target.account {
            return Answer::With(Some(a));
        }
        match self.accounts.credentials.get(&target.registry) {
            Some(c) => Answer::With(Some(c)),
            None if target.answers_challenges => Answer::With(None),
            None => Answer::No,
        }
    }

    /// Upstream just served verified content (or confirmed a tag) to this client for `repo`:
    /// remember that the credential may read it (and, for an object by digest, that the
    /// object belongs there), and learn in the background whether the repository is public.
    /// Called only once the bytes are verified: a redirect to a login page that answers 200
    /// grants nothing.
    pub(super) fn upstream_served(
        self: &Arc<Self>,
        target: &Arc<Target>,
        repo: &RepoKey,
        digest: Option<&Digest>,
        credential: [u8; 32],
        path: String,
    ) {
        match digest {
            Some(d) => {
                self.access
                    .granted_by_upstream(repo, d, credential, StatusCode::OK);
            }
            None => self.access.grant(repo, credential),
        }
        if self.access.should_probe(repo) {
            spawn_public_probe(self.clone(), target.clone(), repo.clone(), path);
        }
    }

    /// Revalidates a tag upstream now (`stowage cache refresh`): every `Accept` variant it
    /// is stored in (or, when none is, the usual list), as a client without credentials
    /// of its own: Stowage answers the registry's challenge itself. For each, the digest
    /// the tag named before and the one it names now; upstream's status when it did not
    /// answer with a manifest.
    pub async fn refresh(
        self: &Arc<Self>,
        key: &TagKey,
    ) -> Result<Vec<(Option<Digest>, Digest)>, String> {
        const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.list.v2+json,application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json";
        let stored: Vec<(String, Option<Digest>)> = match self.cache.store.tag(key) {
            Ok(Some(row)) if !row.variants.is_empty() => row
                .variants
                .into_iter()
                .map(|v| (v.accept, Some(v.digest)))
                .collect(),
            Ok(_) => vec![(ACCEPT_ALL.to_owned(), None)],
            Err(e) => return Err(e.to_string()),
        };
        let mut out = Vec::new();
        for (accept, before) in stored {
            let mut b = Request::builder()
                .method(Method::GET)
                .uri(format!(
                    "/v2/{}/manifests/{}",
                    key.repo.repo,
                    key.tag.as_str()
                ))
                .header(http::header::HOST, key.repo.registry.authority())
                .header(http::header::CACHE_CONTROL, "no-cache");
            if !accept.is_empty() {
                b = b.header(ACCEPT, accept.as_str());
            }
            let req = b.body(empty()).map_err(|e| e.to_string())?;
            let target = Arc::new(Target {
                registry: key.repo.registry.clone(),
                auth_host: false,
                answers_challenges: true,
                account: None,
            });
            let resp = self.serve(target, req).await;
            let status = resp.status();
            let now = resp
                .headers()
                .get(DOCKER_CONTENT_DIGEST)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<Digest>().ok());
            match now {
                Some(d) if status.is_success() => out.push((before, d)),
                _ => return Err(format!("upstream answered {status} for {key}")),
            }
        }
        Ok(out)
    }

    /// Forgets the remembered upstream `404`s for a tag (`cache forget`), for every
    /// credential.
    pub fn forget_negative(&self, key: &TagKey) {
        let (repo, tag) = (key.repo.clone(), key.tag.as_str().to_owned());
        let _ = self
            .negative
            .invalidate_entries_if(move |k, _| k.0 == repo && k.1 == tag);
    }

    /// The `403 DENIED` for a request about a repository `[[registry]] allow` / `deny`
    /// does not let Stowage proxy, if it is one. A path whose repository cannot be read is
    /// denied too where a filter applies (upstream might decode it into any repository).
    fn denied(&self, target: &Target, route: &Route, path: &str) -> Option<Response<Body>> {
        let filter = self.rules.filters.get(&target.registry)?;
        if target.auth_host {
            return None;
        }
        let named = match route.repo() {
            Some(name) => PathRepo::Named(name.clone()),
            None => Route::repository_in(path),
        };
        let why = match named {
            PathRepo::None => return None,
            PathRepo::Named(name) => match filter.check(name.as_str()) {
                Ok(()) => return None,
                Err(rule) => format!("repository {name} is not proxied here ({rule})"),
            },
            PathRepo::Unknown => {
                "this path names no repository Stowage can check against the repository filter"
                    .to_owned()
            }
        };
        tracing::info!(registry = %target.registry, %why, "request denied");
        Some(registry_error(StatusCode::FORBIDDEN, "DENIED", &why))
    }

    /// Serves one registry request for `target`.
    pub async fn serve(
        self: &Arc<Self>,
        target: Arc<Target>,
        req: Request<Body>,
    ) -> Response<Body> {
        let api = self;
        let started = Instant::now();
        let mut req = req;
        let target = if pass_through::holds_placeholder(req.headers()) {
            // Stowage's own stand-in for "no credentials": it never goes upstream.
            req.headers_mut().remove(http::header::AUTHORIZATION);
            Arc::new(Target {
                answers_challenges: true,
                ..(*target).clone()
            })
        } else {
            target
        };
        let route = if target.auth_host {
            Route::Other
        } else {
            Route::classify(req.uri().path())
        };
        let method = req.method().clone();
        if let Some(denied) = api.denied(&target, &route, req.uri().path()) {
            let line = LogLine {
                registry: target.registry.clone(),
                repo: route.repo().map(|r| r.to_string()).unwrap_or_default(),
                kind: route.kind(),
                method: method.to_string(),
                outcome: CacheStatus::Denied,
                status: denied.status().as_u16(),
                started,
                metrics: api.metrics.clone(),
            };
            let mut denied = head_without_body(&method, denied);
            denied.headers_mut().insert(
                X_CACHE,
                HeaderValue::from_static(CacheStatus::Denied.as_str()),
            );
            return Logged::wrap(denied, line);
        }
        // An upstream 404 for this manifest, remembered (`[cache] negative_ttl`).
        let negative_key = match &route {
            Route::Manifest { name, reference } if !api.rules.negative_ttl.is_zero() => Some((
                target.repo(name),
                reference.to_string(),
                credential_id(req.headers()),
            )),
            _ => None,
        };
        let remembered = negative_key
            .as_ref()
            .is_some_and(|k| api.negative.contains_key(k));
        let (outcome, resp) = match (&route, &method) {
            _ if remembered => (
                CacheStatus::Hit,
                Ok(registry_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    "manifest unknown (upstream answered 404 within [cache] negative_ttl)",
                )),
            ),
            (Route::Blob { name, digest }, &Method::GET | &Method::HEAD) => {
                blobs::blob(api, &target, req, name, digest).await
            }
            (
                Route::Manifest {
                    name,
                    reference: Reference::Digest(digest),
                },
                &Method::GET | &Method::HEAD,
            ) => manifests::manifest_by_digest(api, &target, req, name, digest).await,
            (
                Route::Manifest {
                    name,
                    reference: Reference::Tag(tag),
                },
                &Method::GET | &Method::HEAD,
            ) => manifests::manifest_by_tag(api, &target, req, name, tag).await,
            _ => pass_through::pass(api, &target, req).await,
        };
        if let (Some(key), CacheStatus::Miss, Ok(r)) = (negative_key, outcome, &resp) {
            if r.status() == StatusCode::NOT_FOUND {
                api.negative.insert(key, ());
            }
        }
        let resp = match resp {
            Ok(r) => {
                let from_upstream = matches!(outcome, CacheStatus::Miss | CacheStatus::Pass);
                if from_upstream
                    && (r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS)
                {
                    api.metrics.upstream_failure(
                        &target.registry,
                        &route.repo().map(|r| r.to_string()).unwrap_or_default(),
                        r.status().as_str(),
                        &format!(
                            "{} {}: upstream answered {}",
                            method,
                            route.kind(),
                            r.status()
                        ),
                    );
                }
                r
            }
            Err(e) => {
                tracing::warn!(registry = %target.registry, error = %e, "request failed");
                let kind = match &e {
                    ServeError::Upstream(
                        UpstreamError::Timeout { .. } | UpstreamError::BodyStalled(_),
                    ) => Some("timeout"),
                    ServeError::Upstream(UpstreamError::Body(_)) => Some("body"),
                    ServeError::Upstream(UpstreamError::Refused { .. }) => Some("refused"),
                    ServeError::Upstream(UpstreamError::Offline) => None,
                    ServeError::Upstream(_) => Some("connect"),
                    ServeError::DigestMismatch => Some("digest"),
                    _ => None,
                };
                if let Some(k) = kind {
                    api.metrics.upstream_failure(
                        &target.registry,
                        &route.repo().map(|r| r.to_string()).unwrap_or_default(),
                        k,
                        &format!("{} {}: {e}", method, route.kind()),
                    );
                }
                e.into_response()
            }
        };
        let mut resp = head_without_body(&method, resp);
        resp.headers_mut()
            .insert(X_CACHE, HeaderValue::from_static(outcome.as_str()));
        let line = LogLine {
            registry: target.registry.clone(),
            repo: route.repo().map(|r| r.to_string()).unwrap_or_default(),
            kind: route.kind(),
            method: method.to_string(),
            outcome,
            status: resp.status().as_u16(),
            started,
            metrics: api.metrics.clone(),
        };
        Logged::wrap(resp, line)
    }
}

type Served = (CacheStatus, Result<Response<Body>, ServeError>);

/// Client headers as they go upstream: hop-by-hop removed, `Host` recomputed,
/// `Authorization` kept.
fn upstream_headers(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    strip_hop_by_hop(&mut h);
    h.remove(http::header::HOST);
    h
}

/// [`upstream_headers`] for `target`: a request with an account of its own
/// ([`Target::account`]) sends no `Authorization` of the client's; the account answers.
fn upstream_headers_for(target: &Target, headers: &HeaderMap) -> HeaderMap {
    let mut h = upstream_headers(headers);
    if target.account.is_some() {
        h.remove(http::header::AUTHORIZATION);
    }
    h
}

/// An upstream response passed to the client as it is (hop-by-hop headers aside).
fn relay(resp: Response<Body>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body)
}

fn path_and_query(req: &Request<Body>) -> &str {
    req.uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
}

/// A bodiless request upstream on behalf of the client (its credentials, or Stowage's
/// configured account when it has none).
async fn upstream_fetch(
    api: &RegistryApi,
    target: &Target,
    method: Method,
    pq: &str,
    headers: &HeaderMap,
    follow: bool,
) -> Result<Response<Body>, ServeError> {
    let uri = target.uri(pq)?;
    let answer = api.answer(target);
    let fetched = token_auth::fetch(
        &api.upstream,
        method,
        uri,
        upstream_headers_for(target, headers),
        answer,
        follow,
    )
    .await?;
    api.quota.observe(
        &target.registry,
        credential_id(headers),
        fetched.response.headers(),
    );
    Ok(fetched.response)
}

/// A request that is answered upstream without filling the cache. `GET` follows storage
/// redirects itself; `HEAD` is relayed as it is (storage URLs are often signed for GET only).
async fn fetch_uncached(api: &RegistryApi, target: &Target, req: Request<Body>) -> Served {
    let method = req.method().clone();
    let follow = method != Method::HEAD;
    let r = upstream_fetch(
        api,
        target,
        method,
        path_and_query(&req),
        req.headers(),
        follow,
    )
    .await;
    (CacheStatus::Miss, r.map(relay))
}

/// What kind of object a cached digest is served as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Object {
    Blob,
    Manifest,
}

/// The access decision (see `access`) for cached `digest` under `repo`: an
/// [`Authorized`] to serve it with, or the refusal to send instead. `object_path` is the
/// object's own path (`/v2/<repo>/blobs/<digest>` or `.../manifests/<digest>`): asking
/// upstream for it proves both that the client may read the repository and that the
/// object belongs there. `len` is the stored object's size, when known.
#[allow(clippy::too_many_arguments)]
async fn authorize(
    api: &RegistryApi,
    target: &Target,
    repo: &RepoName,
    digest: &Digest,
    object: Object,
    headers: &HeaderMap,
    now: UpstreamNow,
    len: Option<u64>,
) -> Result<Authorized, Response<Body>> {
    let key = target.repo(repo);
    let credential = credential_id(headers);
    // Built only when upstream must be asked (not on a hit that is known to be allowed).
    let ask = || -> crate::access::Ask<'_> {
        let (object_path, headers) = match object {
            Object::Blob => (format!("/v2/{repo}/blobs/{digest}"), headers.clone()),
            Object::Manifest => {
                let mut h = headers.clone();
                if !h.contains_key(ACCEPT) {
                    h.insert(ACCEPT, HeaderValue::from_static(probe::PROBE_ACCEPT));
                }
                (format!("/v2/{repo}/manifests/{digest}"), h)
            }
        };
        let upstream_view = upstream_headers_for(target, &headers);
        let answer = api.answer(target);
        Box::pin(async move {
            probe::ask(
                &api.upstream,
                &target.registry,
                answer,
                &object_path,
                upstream_view,
                len,
            )
            .await
        })
    };
    api.access
        .authorize(&key, digest, credential, now, ask)
        .await
        .map_err(|refusal| match refusal {
            Refusal::Upstream { status, headers } => errors::refusal_response(status, &headers),
            Refusal::Unavailable(why) => {
                registry_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", why)
            }
        })
}

/// Verified content to serve: a file on disk (blobs), or bytes in memory (manifests).
pub(super) enum Stored {
    File(std::fs::File),
    Memory(bytes::Bytes),
}

impl From<std::fs::File> for Stored {
    fn from(f: std::fs::File) -> Stored {
        Stored::File(f)
    }
}

/// Serves verified content: whole, a range, or just the headers for `HEAD`.
fn serve_stored(
    authorized: Authorized,
    content: impl Into<Stored>,
    len: u64,
    content_type: &str,
    method: &Method,
    range: Option<&HeaderValue>,
) -> Result<Response<Body>, ServeError> {
    let (status, start, end) = match parse_range(range, len) {
        None => (StatusCode::OK, 0, len),
        Some(Ok((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
        Some(Err(e)) => return Err(e),
    };
    let body = match content.into() {
        _ if method == Method::HEAD => empty(),
        Stored::File(file) => {
            StreamBody::new(file_stream(Arc::new(file), start, end)).boxed_unsync()
        }
        Stored::Memory(bytes) => full(bytes.slice(start as usize..end as usize)),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    blob_headers(h, authorized.digest());
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    set_len(h, end - start);
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {}-{}/{}", start, end - 1, len)).expect("ascii"),
        );
    }
    Ok(resp)
}

fn blob_headers(headers: &mut HeaderMap, digest: &Digest) {
    // Built by hand: this runs for every hit, and `format!` was most of its cost.
    let (algorithm, hex) = (digest.algorithm().as_str(), digest.hex());
    let mut etag = String::with_capacity(algorithm.len() + hex.len() + 3);
    etag.push('"');
    etag.push_str(algorithm);
    etag.push(':');
    etag.push_str(hex);
    etag.push('"');
    let d = HeaderValue::from_str(&etag[1..etag.len() - 1]).expect("digest is ascii");
    headers.insert(DOCKER_CONTENT_DIGEST, d);
    headers.insert(
        ETAG,
        HeaderValue::from_maybe_shared(bytes::Bytes::from(etag)).expect("ascii"),
    );
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

/// A single byte range, as `start..end` (end exclusive), from a `Range` header.
/// `None`: no usable range (absent, multi-range or malformed: serve the whole body, as
/// RFC 9110 allows). `Some(Err)`: a well-formed range that lies outside the content.
pub fn parse_range(
    header: Option<&HeaderValue>,
    len: u64,
) -> Option<Result<(u64, u64), ServeError>> {
    let spec = header?.to_str().ok()?.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let unsatisfiable = Some(Err(ServeError::RangeNotSatisfiable { len }));
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return unsatisfiable;
        }
        return Some(Ok((len.saturating_sub(n), len)));
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        len.saturating_sub(1)
    } else {
        b.parse::<u64>().ok()?.min(len.saturating_sub(1))
    };
    if !b.is_empty() && b.parse::<u64>().ok()? < start {
        return None;
    }
    if start >= len {
        return unsatisfiable;
    }
    Some(Ok((start, end + 1)))
}

/// Learns, without credentials, whether upstream serves `repo_key` to anyone.
fn spawn_public_probe(api: Arc<RegistryApi>, target: Arc<Target>, key: RepoKey, path: String) {
    let probing = api.clone();
    probing.spawn_background(async move {
        if let Some(status) = probe::anonymous(&api.upstream, &target.registry, &path).await {
            api.access.record_probe(&key, status);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(h: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
        parse_range(Some(&HeaderValue::from_str(h).unwrap()), len).map(|r| r.map_err(|_| ()))
    }

    #[test]
    fn ranges() {
        assert_eq!(r("bytes=100-199", 1000), Some(Ok((100, 200))));
        assert_eq!(r("bytes=900-", 1000), Some(Ok((900, 1000))));
        assert_eq!(r("bytes=-10", 1000), Some(Ok((990, 1000))));
        assert_eq!(r("bytes=-5000", 1000), Some(Ok((0, 1000))));
        assert_eq!(r("bytes=990-5000", 1000), Some(Ok((990, 1000))));
        assert_eq!(r("bytes=1000-", 1000), Some(Err(())));
        assert_eq!(r("bytes=18446744073709551615-", 1000), Some(Err(())));
        assert_eq!(r("bytes=-0", 1000), Some(Err(())));
        assert_eq!(r("bytes=5-1", 1000), None);
        assert_eq!(r("bytes=0-1,5-6", 1000), None);
        assert_eq!(r("items=0-1", 1000), None);
        assert_eq!(r("bytes=abc", 1000), None);
        assert_eq!(r("bytes=99999999999999999999999-", 1000), None);
    }
}
