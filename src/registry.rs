//! Serving the registry API for one upstream host: the request path inside a terminated
//! TLS tunnel (and, later, the mirror and direct listeners).
//!
//! `handle` classifies the request (`oci::Route`) and picks one of four paths:
//! blobs by digest (disk hit, or a coalesced streaming fill), manifests by digest and by
//! tag (buffered, verified, then stored with their media type; tags with a TTL and `HEAD`
//! revalidation, stale on upstream failure), and everything else forwarded unchanged.
//! No cached byte is served before `authorize` (see `access`) agrees. Every response gets
//! `X-Cache` and one access-log line.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    ACCEPT, ACCEPT_ENCODING, ACCEPT_RANGES, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, RANGE, WARNING, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Incoming;

use tracing::Instrument;

use crate::access::{now_ms, Authorized, Refusal, Reply, UpstreamNow};
use crate::auth::{self, credential_id, Answer};
use crate::fill::{file_stream, fill_stream, FillState, Join};
use crate::oci::{Algorithm, Digest, Reference, Registry, RepoKey, RepoName, Route, Tag, TagKey};
use crate::response::{
    empty, full, head_without_body, registry_error, set_len, strip_hop_by_hop, Body, CacheStatus,
    LogLine, Logged, ServeError, DOCKER_CONTENT_DIGEST, X_CACHE,
};
use crate::server::State;
use crate::store::{StoreError, TagVariant};
use crate::upstream::{BoxError, UpBody, UpstreamError};

/// The upstream a tunnel (or listener) serves.
#[derive(Clone, Debug)]
pub struct Target {
    /// Scheme, host and port: everything cached or granted for this target is keyed by it.
    pub registry: Registry,
    /// A registry's auth host (token service): everything is forwarded.
    pub auth_host: bool,
    /// Served through the mirror listener: clients bring no upstream credentials, so
    /// Stowage answers upstream challenges itself (its account, or anonymously).
    pub mirror: bool,
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

pub async fn handle(
    state: Arc<State>,
    target: Arc<Target>,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let route = if target.auth_host {
        Route::Other
    } else {
        Route::classify(req.uri().path())
    };
    let method = req.method().clone();
    let credential = credential_id(req.headers());
    let path = req.uri().path().to_owned();
    let (outcome, resp) = match (&route, &method) {
        (Route::Blob { name, digest }, &Method::GET | &Method::HEAD) => {
            blob(&state, &target, req, name, digest).await
        }
        (
            Route::Manifest {
                name,
                reference: Reference::Digest(digest),
            },
            &Method::GET | &Method::HEAD,
        ) => manifest_by_digest(&state, &target, req, name, digest).await,
        (
            Route::Manifest {
                name,
                reference: Reference::Tag(tag),
            },
            &Method::GET | &Method::HEAD,
        ) => manifest_by_tag(&state, &target, req, name, tag).await,
        _ => pass(&state, &target, req).await,
    };
    let resp = match resp {
        Ok(r) => {
            let from_upstream = matches!(outcome, CacheStatus::Miss | CacheStatus::Pass);
            if from_upstream
                && (r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS)
            {
                state
                    .metrics
                    .upstream_error(&target.registry, r.status().as_str());
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
                ServeError::Upstream(_) => Some("connect"),
                ServeError::DigestMismatch => Some("digest"),
                _ => None,
            };
            if let Some(k) = kind {
                state.metrics.upstream_error(&target.registry, k);
            }
            e.into_response()
        }
    };
    // Upstream just let this credential read this repository (and, for an object by
    // digest, showed that it belongs there): remember it, and learn in the background
    // whether the repository is public. Only a 2xx counts.
    if let Some(repo) = route.repo() {
        let asked_upstream = matches!(outcome, CacheStatus::Miss | CacheStatus::Pass);
        if asked_upstream && resp.status().is_success() {
            let key = target.repo(repo);
            match &route {
                Route::Blob { digest, .. }
                | Route::Manifest {
                    reference: Reference::Digest(digest),
                    ..
                } => {
                    state
                        .access
                        .granted_by_upstream(&key, digest, credential, resp.status());
                }
                _ => state.access.grant(&key, credential),
            }
            if state.access.should_probe(&key) {
                spawn_public_probe(state.clone(), target.clone(), key, path);
            }
        }
    }
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
        metrics: state.metrics.clone(),
    };
    Logged::wrap(resp, line)
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

fn incoming_body(b: Incoming) -> Body {
    b.map_err(BoxError::from).boxed_unsync()
}

/// An upstream response passed to the client as it is (hop-by-hop headers aside).
fn relay(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, incoming_body(body))
}

fn path_and_query(req: &Request<Incoming>) -> &str {
    req.uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
}

/// A bodiless request upstream on behalf of the client (its credentials, or Stowage's
/// configured account when it has none).
async fn upstream_fetch(
    state: &State,
    target: &Target,
    method: Method,
    pq: &str,
    headers: &HeaderMap,
    follow: bool,
) -> Result<Response<Incoming>, ServeError> {
    let uri = target.uri(pq)?;
    let answer = state.answer(target);
    let fetched = auth::fetch(
        &state.upstream,
        &state.tokens,
        method,
        uri,
        upstream_headers(headers),
        answer,
        follow,
    )
    .await?;
    Ok(fetched.response)
}

async fn pass(state: &State, target: &Target, req: Request<Incoming>) -> Served {
    let pq = path_and_query(&req).to_owned();
    let bodiless = matches!(*req.method(), Method::GET | Method::HEAD)
        && !req.headers().contains_key(CONTENT_LENGTH);
    let answers = target.mirror || state.credentials.contains_key(&target.registry);
    if bodiless && !target.auth_host && answers && !req.headers().contains_key(AUTHORIZATION) {
        // Answer the challenge with the configured account (the `/v2/` ping included), so
        // anonymous clients pull as that account.
        let r = upstream_fetch(
            state,
            target,
            req.method().clone(),
            &pq,
            req.headers(),
            false,
        )
        .await;
        return (CacheStatus::Pass, r.map(relay));
    }
    let uri = match target.uri(&pq) {
        Ok(u) => u,
        Err(e) => return (CacheStatus::Pass, Err(e)),
    };
    let (parts, body) = req.into_parts();
    let mut up = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(body.map_err(BoxError::from).boxed_unsync() as UpBody)
        .expect("valid parts");
    *up.headers_mut() = upstream_headers(&parts.headers);
    if target.auth_host && !up.headers().contains_key(AUTHORIZATION) {
        if let Some(c) = state.inject.get(&target.registry) {
            up.headers_mut().insert(AUTHORIZATION, c.basic());
        }
    }
    match state.upstream.send(up).await {
        Ok(resp) => (CacheStatus::Pass, Ok(relay(resp))),
        Err(e) => (CacheStatus::Pass, Err(e.into())),
    }
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
    state: &State,
    target: &Target,
    repo: &RepoName,
    digest: &Digest,
    object: Object,
    headers: &HeaderMap,
    now: UpstreamNow,
    len: Option<u64>,
) -> Result<Authorized, Response<Body>> {
    let key = target.repo(repo);
    let (object_path, headers) = match object {
        Object::Blob => (format!("/v2/{repo}/blobs/{digest}"), headers.clone()),
        Object::Manifest => {
            let mut h = headers.clone();
            if !h.contains_key(ACCEPT) {
                h.insert(ACCEPT, HeaderValue::from_static(PROBE_ACCEPT));
            }
            (format!("/v2/{repo}/manifests/{digest}"), h)
        }
    };
    let credential = credential_id(&headers);
    let ask = || ask_upstream(state, target, object_path, &headers, len);
    state
        .access
        .authorize(&key, digest, credential, now, ask)
        .await
        .map_err(|refusal| match refusal {
            Refusal::Upstream { status, headers } => refusal_response(status, &headers),
            Refusal::Unavailable(why) => {
                registry_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", why)
            }
        })
}

/// "May this client read this object here?", asked upstream with the client's
/// credentials: a `HEAD` of the object. A redirect (blob storage) is followed with a
/// one-byte ranged `GET`, since storage URLs are often signed for `GET` only; it counts as
/// a yes only when storage answers with content of the stored object's size, so a login
/// page at the end of a redirect is no yes.
async fn ask_upstream(
    state: &State,
    target: &Target,
    object_path: String,
    headers: &HeaderMap,
    len: Option<u64>,
) -> Result<Reply, String> {
    let resp = upstream_fetch(state, target, Method::HEAD, &object_path, headers, false)
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_redirection() {
        return Ok(answer_of(&resp));
    }
    let mut ranged = headers.clone();
    ranged.insert(RANGE, HeaderValue::from_static("bytes=0-0"));
    let resp = upstream_fetch(state, target, Method::GET, &object_path, &ranged, true)
        .await
        .map_err(|e| e.to_string())?;
    let size = match resp.status() {
        StatusCode::PARTIAL_CONTENT => resp
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit_once('/'))
            .and_then(|(_, total)| total.parse::<u64>().ok()),
        StatusCode::OK => resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok()),
        _ => return Ok(answer_of(&resp)),
    };
    let matches = match (len, size) {
        (Some(want), Some(got)) => want == got,
        (None, _) => true,
        (Some(_), None) => false,
    };
    Ok(Reply {
        status: if matches {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        },
        headers: HeaderMap::new(),
    })
}

/// The parts of an upstream answer a refusal passes on.
fn answer_of<B>(resp: &Response<B>) -> Reply {
    let mut headers = HeaderMap::new();
    for name in [WWW_AUTHENTICATE, http::header::RETRY_AFTER] {
        for v in resp.headers().get_all(&name) {
            headers.append(name.clone(), v.clone());
        }
    }
    Reply {
        status: resp.status(),
        headers,
    }
}

/// Upstream's refusal as the client should see it: status and challenge, a JSON body.
fn refusal_response(status: StatusCode, passed: &HeaderMap) -> Response<Body> {
    let code = match status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NAME_UNKNOWN",
        429 => "TOOMANYREQUESTS",
        _ => "UNAVAILABLE",
    };
    let mut out = registry_error(status, code, "upstream registry refused access");
    for (name, v) in passed {
        out.headers_mut().append(name.clone(), v.clone());
    }
    out
}

/// The manifest media types Stowage's own requests accept.
const PROBE_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, */*";

/// Upstream's answer to a revalidation `HEAD`, for the client's own request: as it is for a
/// `HEAD`; for a `GET`, the same status and challenge with a registry JSON body (relayed as
/// is, the `HEAD` response's `Content-Length` would announce a body that never comes).
fn revalidation_answer(method: &Method, resp: Response<Incoming>) -> Response<Body> {
    if *method == Method::HEAD {
        return relay(resp);
    }
    let status = resp.status();
    let code = match status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "MANIFEST_UNKNOWN",
        429 => "TOOMANYREQUESTS",
        _ => "UNAVAILABLE",
    };
    let mut out = registry_error(
        status,
        code,
        &format!("upstream registry answered {status}"),
    );
    for name in [WWW_AUTHENTICATE, http::header::RETRY_AFTER] {
        for v in resp.headers().get_all(&name) {
            out.headers_mut().append(name.clone(), v.clone());
        }
    }
    out
}

/// Learns, without credentials, whether upstream serves `repo_key` to anyone.
fn spawn_public_probe(state: Arc<State>, target: Arc<Target>, key: RepoKey, path: String) {
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        let uri = match target.uri(&path) {
            Ok(u) => u,
            Err(_) => return,
        };
        // A manifest HEAD without `Accept` is refused by registries that hold only OCI
        // manifests ("accept header does not support OCI manifests"): offer every type.
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(PROBE_ACCEPT));
        let r = auth::fetch(
            &state.upstream,
            &state.tokens,
            Method::HEAD,
            uri,
            headers,
            Answer::With(None),
            false,
        )
        .await;
        if let Ok(f) = r {
            state.access.record_probe(&key, f.response.status());
        }
    });
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

fn blob_headers(headers: &mut HeaderMap, digest: &Digest) {
    let d = HeaderValue::from_str(&digest.to_string()).expect("digest is ascii");
    headers.insert(DOCKER_CONTENT_DIGEST, d.clone());
    headers.insert(
        ETAG,
        HeaderValue::from_str(&format!("\"{digest}\"")).expect("ascii"),
    );
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

/// Serves verified content from disk: whole, a range, or just the headers for `HEAD`.
fn serve_stored(
    authorized: Authorized,
    file: std::fs::File,
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
    let body = if method == Method::HEAD {
        empty()
    } else {
        StreamBody::new(file_stream(Arc::new(file), start, end)).boxed_unsync()
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

const OCTET_STREAM: &str = "application/octet-stream";

async fn blob(
    state: &Arc<State>,
    target: &Target,
    req: Request<Incoming>,
    repo: &RepoName,
    digest: &Digest,
) -> Served {
    let method = req.method().clone();
    let pq = path_and_query(&req).to_owned();
    match state.store.open_blob(digest) {
        Ok(Some((file, len))) => {
            let authorized = match authorize(
                state,
                target,
                repo,
                digest,
                Object::Blob,
                req.headers(),
                UpstreamNow::Ask,
                Some(len),
            )
            .await
            {
                Ok(a) => a,
                Err(refused) => return (CacheStatus::Hit, Ok(refused)),
            };
            return (
                CacheStatus::Hit,
                serve_stored(
                    authorized,
                    file,
                    len,
                    OCTET_STREAM,
                    &method,
                    req.headers().get(RANGE),
                ),
            );
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(%digest, error = %e, "cannot read cached blob; passing through");
            return fetch_uncached_blob(state, target, req, digest).await;
        }
    }
    // A HEAD or a ranged GET on a miss is answered upstream and does not start a fill.
    if method == Method::HEAD || req.headers().contains_key(RANGE) {
        return fetch_uncached_blob(state, target, req, digest).await;
    }
    if state.fills.in_flight() >= state.config.cache.max_concurrent_fills
        && !state.fills.is_filling(digest)
    {
        tracing::debug!(%digest, "fill limit reached; passing through");
        return fetch_uncached_blob(state, target, req, digest).await;
    }
    if let Err(why) = state.may_cache() {
        state.metrics.write_error(why);
        tracing::debug!(%digest, why, "not caching; passing through");
        return fetch_uncached_blob(state, target, req, digest).await;
    }
    let join = match state.fills.join(&state.store, digest) {
        Ok(j) => j,
        Err(e) => {
            state.metrics.write_error("create");
            tracing::warn!(%digest, error = %e, "cannot start a fill; passing through");
            return fetch_uncached_blob(state, target, req, digest).await;
        }
    };
    match join {
        Join::Stored => match state.store.open_blob(digest) {
            Ok(Some((file, len))) => {
                let authorized = match authorize(
                    state,
                    target,
                    repo,
                    digest,
                    Object::Blob,
                    req.headers(),
                    UpstreamNow::Ask,
                    Some(len),
                )
                .await
                {
                    Ok(a) => a,
                    Err(refused) => return (CacheStatus::Hit, Ok(refused)),
                };
                (
                    CacheStatus::Hit,
                    serve_stored(authorized, file, len, OCTET_STREAM, &method, None),
                )
            }
            _ => fetch_uncached_blob(state, target, req, digest).await,
        },
        Join::Follower(fill) => {
            // Joining someone else's download is a hit on bytes this client has not been
            // authorized for yet.
            let authorized = match authorize(
                state,
                target,
                repo,
                digest,
                Object::Blob,
                req.headers(),
                UpstreamNow::Ask,
                None,
            )
            .await
            {
                Ok(a) => a,
                Err(refused) => return (CacheStatus::Coalesced, Ok(refused)),
            };
            state.metrics.coalesced_readers.inc();
            let mut rx = fill.subscribe();
            let state_now = rx
                .wait_for(|s| !matches!(s, FillState::Waiting))
                .await
                .map(|s| s.clone());
            match state_now {
                Ok(FillState::Streaming { total, .. }) => (
                    CacheStatus::Coalesced,
                    Ok(fill_response(authorized, fill, total)),
                ),
                // All of it is there and verified, only fsyncs pending: a hit in all but name.
                Ok(FillState::Verified { len } | FillState::Complete { len }) => (
                    CacheStatus::Hit,
                    Ok(fill_response(authorized, fill, Some(len))),
                ),
                // The leader's upstream answer was not content (401, 404, error): this client
                // asks upstream itself, with its own credentials.
                _ => fetch_uncached_blob(state, target, req, digest).await,
            }
        }
        Join::Leader(leader) => {
            // The shared tier first: content another replica fetched and verified. It is
            // cached content, so the client must be authorized for it like a hit.
            if let Some(backend) = state.backend.clone() {
                let authorized = match authorize(
                    state,
                    target,
                    repo,
                    digest,
                    Object::Blob,
                    req.headers(),
                    UpstreamNow::Ask,
                    None,
                )
                .await
                {
                    Ok(a) => a,
                    Err(refused) => {
                        leader.abandon("client not authorized");
                        return (CacheStatus::Hit, Ok(refused));
                    }
                };
                match backend.get(digest).await {
                    Ok(Some((body, len))) => {
                        let fill = leader.fill();
                        spawn_fill(state, leader, body, Some(len), false);
                        return (
                            CacheStatus::Hit,
                            Ok(fill_response(authorized, fill, Some(len))),
                        );
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(%digest, error = %e, "shared store unavailable; asking upstream")
                    }
                }
            }
            let mut headers = req.headers().clone();
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
            let resp = match upstream_fetch(state, target, Method::GET, &pq, &headers, true).await {
                Ok(r) => r,
                Err(e) => {
                    leader.abandon(&e.to_string());
                    return (CacheStatus::Miss, Err(e));
                }
            };
            if resp.status() != StatusCode::OK {
                leader.abandon(&format!("upstream answered {}", resp.status()));
                return (CacheStatus::Miss, Ok(relay(resp)));
            }
            let total = resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if total.is_some_and(|t| t > state.max_size) {
                leader.abandon("larger than the whole cache");
                return (CacheStatus::Miss, Ok(verified_relay(state, resp, digest)));
            }
            // A blob that would fill the disk is passed through whole rather than failing
            // half-way through the write.
            if let (Some(t), Some(free)) = (total, state.store.free_space()) {
                if free < t.saturating_add(state.config.cache.min_free.0) {
                    state.metrics.write_error("disk_full");
                    tracing::info!(%digest, bytes = t, free, "not enough free space to cache this blob; passing through");
                    leader.abandon("not enough free space");
                    return (CacheStatus::Miss, Ok(verified_relay(state, resp, digest)));
                }
            }
            // Upstream's 200 to this client's own request is its authorization for the
            // bytes it sends.
            let Some(authorized) = state.access.granted_by_upstream(
                &target.repo(repo),
                digest,
                credential_id(req.headers()),
                resp.status(),
            ) else {
                leader.abandon("upstream did not answer 200");
                return (CacheStatus::Miss, Ok(relay(resp)));
            };
            let fill = leader.fill();
            spawn_fill(state, leader, incoming_body(resp.into_body()), total, true);
            (
                CacheStatus::Miss,
                Ok(fill_response(authorized, fill, total)),
            )
        }
    }
}

/// Runs a fill to completion in the background (even if this client goes away), then,
/// for content new to the shared tier, uploads it there.
fn spawn_fill(
    state: &Arc<State>,
    leader: crate::fill::Leader,
    body: Body,
    total: Option<u64>,
    upload: bool,
) {
    let digest = leader.digest().clone();
    let span = tracing::info_span!("fill", %digest);
    let st = state.clone();
    state.tasks.spawn(
        async move {
            let idle = st.upstream.idle_timeout();
            match leader.run(body, total, idle).await {
                Ok(len) => {
                    tracing::debug!(bytes = len, "stored");
                    if let (true, Some(backend)) = (upload, st.backend.clone()) {
                        let path = st.store.path(&digest);
                        match backend.put(&digest, &path, len).await {
                            Ok(()) => tracing::debug!("uploaded to the shared store"),
                            Err(e) => {
                                st.metrics.write_error("shared_store");
                                tracing::warn!(error = %e, "upload to the shared store failed")
                            }
                        }
                    }
                }
                Err(e) if e.is_mismatch() => {
                    st.metrics.digest_mismatches.inc();
                    tracing::error!(error = %e, "digest mismatch: content discarded")
                }
                Err(crate::fill::FillError::Store(e)) => {
                    st.metrics.write_error("write");
                    st.pause_caching();
                    tracing::error!(error = %e, "cache write failed; caching paused for a while")
                }
                Err(e) => tracing::warn!(error = %e, "fill failed"),
            }
        }
        .instrument(span),
    );
}

fn fill_response(
    authorized: Authorized,
    fill: Arc<crate::fill::Fill>,
    total: Option<u64>,
) -> Response<Body> {
    let mut resp = Response::new(StreamBody::new(fill_stream(fill, 0)).boxed_unsync());
    let h = resp.headers_mut();
    blob_headers(h, authorized.digest());
    h.insert(CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM));
    if let Some(t) = total {
        set_len(h, t);
    }
    resp
}

/// A request that is answered upstream without filling the cache. `GET` follows storage
/// redirects itself; `HEAD` is relayed as it is (storage URLs are often signed for GET only).
async fn fetch_uncached(state: &State, target: &Target, req: Request<Incoming>) -> Served {
    let method = req.method().clone();
    let follow = method != Method::HEAD;
    let r = upstream_fetch(
        state,
        target,
        method,
        path_and_query(&req),
        req.headers(),
        follow,
    )
    .await;
    (CacheStatus::Miss, r.map(relay))
}

/// A blob request answered upstream without filling the cache. A whole `200` body is
/// hashed as it passes and its last frame held back until it matches `digest`, so wrong
/// content never reaches the client complete (a range cannot be checked and is relayed).
async fn fetch_uncached_blob(
    state: &State,
    target: &Target,
    req: Request<Incoming>,
    digest: &Digest,
) -> Served {
    let get = req.method() == Method::GET;
    let (outcome, r) = fetch_uncached(state, target, req).await;
    let r = r.map(|resp| {
        if get && resp.status() == StatusCode::OK {
            verify_body(state, resp, digest)
        } else {
            resp
        }
    });
    (outcome, r)
}

/// `relay`, with the body verified against `digest` (see `fetch_uncached_blob`).
fn verified_relay(state: &State, resp: Response<Incoming>, digest: &Digest) -> Response<Body> {
    verify_body(state, relay(resp), digest)
}

fn verify_body(state: &State, resp: Response<Body>, digest: &Digest) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let verified = crate::fill::Verified::new(body, digest.clone(), Some(state.metrics.clone()));
    Response::from_parts(parts, verified.boxed_unsync())
}

/// A stored manifest with its length and media type, if both are present. Synchronous, as
/// blob hits and tag lookups are: a redb read and an `open` of a small file cost less than
/// a hop to the blocking pool (removing that hop took manifest `HEAD`s from 0.51x to 0.73x
/// nginx's rate in bench/RESULTS.md).
fn stored_manifest(state: &State, digest: &Digest) -> Option<(std::fs::File, u64, String)> {
    let media_type = state.store.media_type(digest).ok()??;
    let (file, len) = state.store.open_blob(digest).ok()??;
    Some((file, len, media_type))
}

async fn manifest_by_digest(
    state: &State,
    target: &Target,
    req: Request<Incoming>,
    repo: &RepoName,
    digest: &Digest,
) -> Served {
    let method = req.method().clone();
    let pq = path_and_query(&req).to_owned();
    if let Some((file, len, media_type)) = stored_manifest(state, digest) {
        let authorized = match authorize(
            state,
            target,
            repo,
            digest,
            Object::Manifest,
            req.headers(),
            UpstreamNow::Ask,
            Some(len),
        )
        .await
        {
            Ok(a) => a,
            Err(refused) => return (CacheStatus::Hit, Ok(refused)),
        };
        return (
            CacheStatus::Hit,
            serve_stored(authorized, file, len, &media_type, &method, None),
        );
    }
    if method == Method::HEAD {
        return fetch_uncached(state, target, req).await;
    }
    match fetch_manifest(state, target, &pq, req.headers(), Some(digest)).await {
        Ok(Fetch::Stored(resp, _)) => {
            record_pending_tags(state, target, repo, digest).await;
            (CacheStatus::Miss, Ok(resp))
        }
        Ok(Fetch::Relayed(resp)) => (CacheStatus::Miss, Ok(resp)),
        Err(e) => (CacheStatus::Miss, Err(e)),
    }
}

enum Fetch {
    /// A verified manifest, stored, with the response to send and its digest.
    Stored(Response<Body>, Digest),
    /// Upstream's answer was not a cacheable manifest; relayed as is.
    Relayed(Response<Body>),
}

/// GETs a manifest upstream, verifies it (against `expected`, or against the
/// `Docker-Content-Digest` upstream sent for a tag), and stores it with its media type.
async fn fetch_manifest(
    state: &State,
    target: &Target,
    pq: &str,
    headers: &HeaderMap,
    expected: Option<&Digest>,
) -> Result<Fetch, ServeError> {
    let resp = upstream_fetch(state, target, Method::GET, pq, headers, true).await?;
    if resp.status() != StatusCode::OK {
        return Ok(Fetch::Relayed(relay(resp)));
    }
    let limit = state.max_manifest_size;
    let announced = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit) {
        // Too big to buffer: relay it unverified and uncached.
        return Ok(Fetch::Relayed(relay(resp)));
    }
    let (mut parts, body) = resp.into_parts();
    let idle = state.upstream.idle_timeout();
    let bytes: Bytes =
        match tokio::time::timeout(idle, Limited::new(body, limit as usize).collect()).await {
            Err(_) => return Err(UpstreamError::BodyStalled(idle).into()),
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return Err(ServeError::ManifestTooLarge(limit))
            }
            Ok(Err(e)) => return Err(UpstreamError::Body(e.to_string()).into()),
            Ok(Ok(c)) => c.to_bytes(),
        };
    let announced_digest = parts
        .headers
        .get(DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let digest = match (expected, announced_digest) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => d,
        (None, None) => Digest::from_bytes(
            Algorithm::Sha256,
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref(),
        ),
    };
    let media_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let store = state.store.clone();
    let (d, b) = (digest.clone(), bytes.clone());
    let stored = tokio::task::spawn_blocking(move || {
        store.put(&d, &b)?;
        if !media_type.is_empty() {
            store.set_media_type(&d, &media_type)?;
        }
        Ok::<_, StoreError>(())
    })
    .await;
    match stored {
        Ok(Ok(())) => {}
        Ok(Err(StoreError::Mismatch { expected, actual })) => {
            state.metrics.digest_mismatches.inc();
            tracing::error!(%expected, %actual, "manifest digest mismatch: discarded");
            return Err(ServeError::DigestMismatch);
        }
        Ok(Err(e)) => {
            state.metrics.write_error("write");
            tracing::warn!(%digest, error = %e, "manifest verified but not cached")
        }
        Err(e) => tracing::warn!(%digest, error = %e, "manifest store task failed"),
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(
        DOCKER_CONTENT_DIGEST,
        HeaderValue::from_str(&digest.to_string()).expect("ascii"),
    );
    set_len(&mut parts.headers, bytes.len() as u64);
    Ok(Fetch::Stored(
        Response::from_parts(parts, full(bytes)),
        digest,
    ))
}

/// The media types a client accepts, normalised (sorted, parameters dropped) so the same
/// client always hits the same tag entry.
fn accept_key(headers: &HeaderMap) -> String {
    let mut types: Vec<String> = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|t| !t.is_empty())
        .collect();
    types.sort();
    types.dedup();
    types.join(",")
}

/// A tag resolved with `HEAD` (containerd does this, then fetches by digest): `HEAD` stays
/// `HEAD` upstream, so the manifest is not here yet and the tag cannot be recorded (a tag
/// row is only written once its content is stored). It is recorded now if the content is
/// already stored, else when that manifest is stored by digest within `PENDING_TAG_TTL`.
async fn remember_tag_head(state: &State, key: &TagKey, accept: String, headers: &HeaderMap) {
    let Some(digest) = headers
        .get(DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok())
    else {
        return;
    };
    let media_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if media_type.is_empty() {
        return;
    }
    let variant = TagVariant {
        accept,
        digest: digest.clone(),
        media_type,
        checked_at_ms: now_ms(),
    };
    if stored_manifest(state, &digest).is_some() {
        set_tag(state, key.clone(), variant).await;
        return;
    }
    let pending_key = (key.repo.clone(), digest);
    let mut tags = state.pending_tags.get(&pending_key).unwrap_or_default();
    tags.retain(|(k, v)| !(k == key && v.accept == variant.accept));
    tags.push((key.clone(), variant));
    tags.truncate(MAX_PENDING_TAGS);
    state.pending_tags.insert(pending_key, tags);
}

/// Records the tags whose `HEAD` named `digest`, now that it is stored.
async fn record_pending_tags(state: &State, target: &Target, repo: &RepoName, digest: &Digest) {
    let pending_key = (target.repo(repo), digest.clone());
    if let Some(tags) = state.pending_tags.remove(&pending_key) {
        for (key, variant) in tags {
            set_tag(state, key, variant).await;
        }
    }
}

async fn set_tag(state: &State, key: TagKey, variant: TagVariant) {
    let store = state.store.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.set_tag(&key, variant)).await {
        tracing::warn!(error = %e, "tag not recorded");
    }
}

/// Tags resolved with `HEAD` wait this long for their manifest to be fetched by digest.
pub const PENDING_TAG_TTL: std::time::Duration = std::time::Duration::from_secs(600);
/// Most tags (accept variants) remembered for one pending digest.
const MAX_PENDING_TAGS: usize = 16;

async fn manifest_by_tag(
    state: &State,
    target: &Target,
    req: Request<Incoming>,
    repo: &RepoName,
    tag: &Tag,
) -> Served {
    let method = req.method().clone();
    let pq = path_and_query(&req).to_owned();
    let key = TagKey::new(target.repo(repo), tag.clone());
    let accept = accept_key(req.headers());
    let row = state.store.tag(&key).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "tag lookup failed; treating as a miss");
        None
    });
    let cached = row
        .as_ref()
        .and_then(|r| r.variant(&accept))
        .and_then(|v| stored_manifest(state, &v.digest).map(|(f, len, _)| (v.clone(), f, len)));
    if let Some((variant, file, len)) = cached {
        let digest = variant.digest.clone();
        let ttl = state.config.tag_ttl(&target.registry, tag.as_str());
        if state.offline() || variant.is_fresh(now_ms(), ttl) {
            let authorized = match authorize(
                state,
                target,
                repo,
                &digest,
                Object::Manifest,
                req.headers(),
                UpstreamNow::Ask,
                Some(len),
            )
            .await
            {
                Ok(a) => a,
                Err(refused) => return (CacheStatus::Hit, Ok(refused)),
            };
            return (
                CacheStatus::Hit,
                serve_stored(authorized, file, len, &variant.media_type, &method, None),
            );
        }
        // Stale: revalidate with HEAD, which Docker Hub does not count against pull limits.
        let head = upstream_fetch(state, target, Method::HEAD, &pq, req.headers(), false).await;
        match head {
            Ok(r) if r.status() == StatusCode::OK => {
                let upstream_digest = r
                    .headers()
                    .get(DOCKER_CONTENT_DIGEST)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<Digest>().ok());
                if upstream_digest.as_ref() == Some(&digest) {
                    // Upstream just confirmed, for this client, that the tag names this
                    // manifest in this repository.
                    let authorized = state
                        .access
                        .granted_by_upstream(
                            &key.repo,
                            &digest,
                            credential_id(req.headers()),
                            r.status(),
                        )
                        .expect("a 200 authorizes");
                    let updated = TagVariant {
                        checked_at_ms: now_ms(),
                        ..variant.clone()
                    };
                    set_tag(state, key.clone(), updated).await;
                    return (
                        CacheStatus::Hit,
                        serve_stored(authorized, file, len, &variant.media_type, &method, None),
                    );
                }
                // The tag moved (or upstream did not say where): fetch it below.
            }
            Ok(r) if matches!(r.status().as_u16(), 401 | 403 | 404) => {
                return (CacheStatus::Miss, Ok(revalidation_answer(&method, r)))
            }
            other => {
                let why = match &other {
                    Ok(r) => format!("upstream answered {}", r.status()),
                    Err(e) => e.to_string(),
                };
                // The same decision as every hit, told that upstream is failing right now.
                let decided = authorize(
                    state,
                    target,
                    repo,
                    &digest,
                    Object::Manifest,
                    req.headers(),
                    UpstreamNow::Failing,
                    Some(len),
                )
                .await;
                if let Ok(authorized) = decided {
                    tracing::warn!(tag = %key, %why, "serving a stale manifest");
                    let mut resp = match serve_stored(
                        authorized,
                        file,
                        len,
                        &variant.media_type,
                        &method,
                        None,
                    ) {
                        Ok(r) => r,
                        Err(e) => return (CacheStatus::Stale, Err(e)),
                    };
                    resp.headers_mut().insert(
                        WARNING,
                        HeaderValue::from_static("110 stowage \"Response is Stale\""),
                    );
                    return (CacheStatus::Stale, Ok(resp));
                }
                return match other {
                    Ok(r) => (CacheStatus::Miss, Ok(revalidation_answer(&method, r))),
                    Err(e) => (CacheStatus::Miss, Err(e)),
                };
            }
        }
    }
    if method == Method::HEAD {
        let served = fetch_uncached(state, target, req).await;
        if let (_, Ok(resp)) = &served {
            if resp.status() == StatusCode::OK {
                remember_tag_head(state, &key, accept, resp.headers()).await;
            }
        }
        return served;
    }
    match fetch_manifest(state, target, &pq, req.headers(), None).await {
        Ok(Fetch::Stored(resp, digest)) => {
            let media_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            if !media_type.is_empty() {
                let variant = TagVariant {
                    accept,
                    digest,
                    media_type,
                    checked_at_ms: now_ms(),
                };
                set_tag(state, key, variant).await;
            }
            (CacheStatus::Miss, Ok(resp))
        }
        Ok(Fetch::Relayed(resp)) => (CacheStatus::Miss, Ok(resp)),
        Err(e) => (CacheStatus::Miss, Err(e)),
    }
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
