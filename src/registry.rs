//! Serving the registry API for one upstream host: the request path inside a terminated
//! TLS tunnel (and, later, the mirror and direct listeners).
//!
//! `handle` classifies the request (`oci::Route`) and picks one of three paths:
//! blobs by digest (disk hit, or a coalesced streaming fill), manifests by digest (buffered,
//! verified, then stored with their media type), and everything else forwarded unchanged.
//! Every response gets `X-Cache` and one access-log line.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, RANGE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Incoming;

use crate::fill::{file_stream, fill_stream, FillState, Join};
use crate::oci::{Digest, Reference, Route};
use crate::response::{
    empty, full, set_len, strip_hop_by_hop, Body, CacheStatus, LogLine, Logged, ServeError, DOCKER_CONTENT_DIGEST,
    X_CACHE,
};
use crate::server::State;
use crate::upstream::{BoxError, UpBody};

/// The upstream a tunnel (or listener) serves.
#[derive(Clone, Debug)]
pub struct Target {
    pub scheme: &'static str,
    pub host: String,
    pub port: u16,
    /// A registry's auth host (token service): everything is forwarded.
    pub auth_host: bool,
}

impl Target {
    fn uri(&self, path_and_query: &str) -> Result<Uri, ServeError> {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let default_port = if self.scheme == "https" { 443 } else { 80 };
        let authority = if self.port == default_port { host } else { format!("{host}:{}", self.port) };
        format!("{}://{}{}", self.scheme, authority, path_and_query)
            .parse()
            .map_err(|_| ServeError::Upstream(crate::upstream::UpstreamError::BadUri(path_and_query.chars().take(100).collect())))
    }
}

pub async fn handle(state: Arc<State>, target: Arc<Target>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let route = if target.auth_host { Route::Other } else { Route::classify(req.uri().path()) };
    let method = req.method().clone();
    let (outcome, resp) = match (&route, &method) {
        (Route::Blob { digest, .. }, &Method::GET | &Method::HEAD) => blob(&state, &target, req, digest).await,
        (Route::Manifest { reference: Reference::Digest(digest), .. }, &Method::GET | &Method::HEAD) => {
            manifest(&state, &target, req, digest).await
        }
        _ => pass(&state, &target, req).await,
    };
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(host = %target.host, error = %e, "request failed");
            e.into_response()
        }
    };
    resp.headers_mut().insert(X_CACHE, HeaderValue::from_static(outcome.as_str()));
    let line = LogLine {
        registry: target.host.clone(),
        repo: route.repo().map(|r| r.to_string()).unwrap_or_default(),
        kind: route.kind(),
        method: method.to_string(),
        outcome,
        status: resp.status().as_u16(),
        started,
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

async fn pass(state: &State, target: &Target, req: Request<Incoming>) -> Served {
    let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
    let uri = match target.uri(&pq) {
        Ok(u) => u,
        Err(e) => return (CacheStatus::Pass, Err(e)),
    };
    let (parts, body) = req.into_parts();
    let mut up = Request::builder().method(parts.method).uri(uri).body(body.map_err(BoxError::from).boxed_unsync() as UpBody).expect("valid parts");
    *up.headers_mut() = upstream_headers(&parts.headers);
    match state.upstream.send(up).await {
        Ok(resp) => (CacheStatus::Pass, Ok(relay(resp))),
        Err(e) => (CacheStatus::Pass, Err(e.into())),
    }
}

/// A single byte range, as `start..end` (end exclusive), from a `Range` header.
/// `None`: no usable range (absent, multi-range or malformed: serve the whole body, as
/// RFC 9110 allows). `Some(Err)`: a well-formed range that lies outside the content.
fn parse_range(header: Option<&HeaderValue>, len: u64) -> Option<Result<(u64, u64), ServeError>> {
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
    let end = if b.is_empty() { len.saturating_sub(1) } else { b.parse::<u64>().ok()?.min(len.saturating_sub(1)) };
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
    headers.insert(ETAG, HeaderValue::from_str(&format!("\"{digest}\"")).expect("ascii"));
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

/// Serves verified content from disk: whole, a range, or just the headers for `HEAD`.
fn serve_stored(
    file: std::fs::File,
    len: u64,
    digest: &Digest,
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
    blob_headers(h, digest);
    h.insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")));
    set_len(h, end - start);
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(CONTENT_RANGE, HeaderValue::from_str(&format!("bytes {}-{}/{}", start, end - 1, len)).expect("ascii"));
    }
    Ok(resp)
}

const OCTET_STREAM: &str = "application/octet-stream";

async fn blob(state: &State, target: &Target, req: Request<Incoming>, digest: &Digest) -> Served {
    let method = req.method().clone();
    match state.store.open_blob(digest) {
        Ok(Some((file, len))) => {
            return (CacheStatus::Hit, serve_stored(file, len, digest, OCTET_STREAM, &method, req.headers().get(RANGE)));
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(%digest, error = %e, "cannot read cached blob; passing through");
            return fetch_uncached(state, target, req).await;
        }
    }
    // A HEAD or a ranged GET on a miss is answered upstream and does not start a fill.
    if method == Method::HEAD || req.headers().contains_key(RANGE) {
        return fetch_uncached(state, target, req).await;
    }
    let join = match state.fills.join(&state.store, digest) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(%digest, error = %e, "cannot start a fill; passing through");
            return fetch_uncached(state, target, req).await;
        }
    };
    match join {
        Join::Stored => match state.store.open_blob(digest) {
            Ok(Some((file, len))) => (CacheStatus::Hit, serve_stored(file, len, digest, OCTET_STREAM, &method, None)),
            _ => fetch_uncached(state, target, req).await,
        },
        Join::Follower(fill) => {
            let mut rx = fill.subscribe();
            let state_now = rx.wait_for(|s| !matches!(s, FillState::Waiting)).await.map(|s| s.clone());
            match state_now {
                Ok(FillState::Streaming { total, .. }) => (CacheStatus::Coalesced, Ok(fill_response(fill_body(fill, total), total, digest))),
                Ok(FillState::Complete { len }) => (CacheStatus::Coalesced, Ok(fill_response(fill_body(fill, Some(len)), Some(len), digest))),
                // The leader's upstream answer was not content (401, 404, error): this client
                // asks upstream itself, with its own credentials.
                _ => fetch_uncached(state, target, req).await,
            }
        }
        Join::Leader(leader) => {
            let uri = match target.uri(req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/")) {
                Ok(u) => u,
                Err(e) => return (CacheStatus::Miss, Err(e)),
            };
            let mut headers = upstream_headers(req.headers());
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
            let fetched = match state.upstream.fetch(Method::GET, uri, headers).await {
                Ok(f) => f,
                Err(e) => {
                    leader.abandon(&e.to_string());
                    return (CacheStatus::Miss, Err(e.into()));
                }
            };
            let resp = fetched.response;
            if resp.status() != StatusCode::OK {
                leader.abandon(&format!("upstream answered {}", resp.status()));
                return (CacheStatus::Miss, Ok(relay(resp)));
            }
            let total = resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
            let fill = leader.fill();
            let idle = state.upstream.idle_timeout();
            let digest_s = digest.to_string();
            let span = tracing::info_span!("fill", digest = %digest_s);
            // Detached: the fill completes for the cache (and other readers) even if this
            // client goes away.
            state.tasks.spawn(tracing::Instrument::instrument(
                async move {
                    match leader.run(resp.into_body(), total, idle).await {
                        Ok(len) => tracing::debug!(bytes = len, "stored"),
                        Err(e) if e.is_mismatch() => tracing::error!(error = %e, "digest mismatch: upstream content discarded"),
                        Err(e) => tracing::warn!(error = %e, "fill failed"),
                    }
                },
                span,
            ));
            (CacheStatus::Miss, Ok(fill_response(fill_body(fill, total), total, digest)))
        }
    }
}

fn fill_body(fill: Arc<crate::fill::Fill>, _total: Option<u64>) -> Body {
    StreamBody::new(fill_stream(fill, 0)).boxed_unsync()
}

fn fill_response(body: Body, total: Option<u64>, digest: &Digest) -> Response<Body> {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    blob_headers(h, digest);
    h.insert(CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM));
    if let Some(t) = total {
        set_len(h, t);
    }
    resp
}

/// A request that is answered upstream without filling the cache, redirects followed.
async fn fetch_uncached(state: &State, target: &Target, req: Request<Incoming>) -> Served {
    let uri = match target.uri(req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/")) {
        Ok(u) => u,
        Err(e) => return (CacheStatus::Pass, Err(e)),
    };
    let method = req.method().clone();
    if method == Method::HEAD {
        // A HEAD is relayed as it is: storage URLs are often signed for GET only.
        let mut up = Request::builder().method(Method::HEAD).uri(uri).body(crate::upstream::empty()).expect("valid parts");
        *up.headers_mut() = upstream_headers(req.headers());
        return match state.upstream.send(up).await {
            Ok(r) => (CacheStatus::Miss, Ok(relay(r))),
            Err(e) => (CacheStatus::Miss, Err(e.into())),
        };
    }
    match state.upstream.fetch(method, uri, upstream_headers(req.headers())).await {
        Ok(f) => (CacheStatus::Miss, Ok(relay(f.response))),
        Err(e) => (CacheStatus::Miss, Err(e.into())),
    }
}

async fn manifest(state: &State, target: &Target, req: Request<Incoming>, digest: &Digest) -> Served {
    let method = req.method().clone();
    let store = state.store.clone();
    let d = digest.clone();
    let cached = tokio::task::spawn_blocking(move || -> Option<(std::fs::File, u64, String)> {
        let media_type = store.media_type(&d).ok()??;
        let (file, len) = store.open_blob(&d).ok()??;
        Some((file, len, media_type))
    })
    .await
    .ok()
    .flatten();
    if let Some((file, len, media_type)) = cached {
        return (CacheStatus::Hit, serve_stored(file, len, digest, &media_type, &method, None));
    }
    if method == Method::HEAD {
        return fetch_uncached(state, target, req).await;
    }
    let uri = match target.uri(req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/")) {
        Ok(u) => u,
        Err(e) => return (CacheStatus::Miss, Err(e)),
    };
    let resp = match state.upstream.fetch(Method::GET, uri, upstream_headers(req.headers())).await {
        Ok(f) => f.response,
        Err(e) => return (CacheStatus::Miss, Err(e.into())),
    };
    if resp.status() != StatusCode::OK {
        return (CacheStatus::Miss, Ok(relay(resp)));
    }
    let limit = state.max_manifest_size;
    let announced = resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit) {
        // Too big to buffer: relay it unverified and uncached.
        return (CacheStatus::Pass, Ok(relay(resp)));
    }
    let (mut parts, body) = resp.into_parts();
    let idle = state.upstream.idle_timeout();
    let collected = tokio::time::timeout(idle, Limited::new(body, limit as usize).collect()).await;
    let bytes: Bytes = match collected {
        Err(_) => return (CacheStatus::Miss, Err(crate::upstream::UpstreamError::BodyStalled(idle).into())),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                return (CacheStatus::Miss, Err(ServeError::ManifestTooLarge(limit)));
            }
            return (CacheStatus::Miss, Err(crate::upstream::UpstreamError::Body(e.to_string()).into()));
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    let media_type = parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let store = state.store.clone();
    let d = digest.clone();
    let b = bytes.clone();
    let stored = tokio::task::spawn_blocking(move || {
        store.put(&d, &b)?;
        if !media_type.is_empty() {
            store.set_media_type(&d, &media_type)?;
        }
        Ok::<_, crate::store::StoreError>(())
    })
    .await;
    match stored {
        Ok(Ok(())) => {}
        Ok(Err(crate::store::StoreError::Mismatch { expected, actual })) => {
            tracing::error!(%expected, %actual, "manifest digest mismatch: discarded");
            return (CacheStatus::Miss, Err(ServeError::DigestMismatch));
        }
        Ok(Err(e)) => tracing::warn!(%digest, error = %e, "manifest verified but not cached"),
        Err(e) => tracing::warn!(%digest, error = %e, "manifest store task failed"),
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(DOCKER_CONTENT_DIGEST, HeaderValue::from_str(&digest.to_string()).expect("ascii"));
    set_len(&mut parts.headers, bytes.len() as u64);
    (CacheStatus::Miss, Ok(Response::from_parts(parts, full(bytes))))
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

    #[test]
    fn target_uris_keep_non_default_ports() {
        let t = Target { scheme: "https", host: "quay.io".into(), port: 5443, auth_host: false };
        assert_eq!(t.uri("/v2/?x=1").unwrap().to_string(), "https://quay.io:5443/v2/?x=1");
        let t = Target { scheme: "https", host: "ghcr.io".into(), port: 443, auth_host: false };
        assert_eq!(t.uri("/v2/").unwrap().to_string(), "https://ghcr.io/v2/");
        let t = Target { scheme: "https", host: "::1".into(), port: 8443, auth_host: false };
        assert_eq!(t.uri("/v2/").unwrap().to_string(), "https://[::1]:8443/v2/");
    }
}
