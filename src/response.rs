//! Response bodies, the outcome of a request, and the one place errors become responses.
//!
//! Every error Stowage itself produces inside the registry API is a registry JSON error
//! body (`{"errors":[{"code","message"}]}`) with a status chosen here. The `Logged` body
//! emits the per-request access-log line when the response body is finished or dropped,
//! so the line carries the bytes really sent.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

use crate::upstream::{BoxError, UpstreamError};

pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// How a request was served; feeds the log line and the `X-Cache` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from verified content on disk.
    Hit,
    /// Fetched upstream by this request (and stored when it was cacheable and verified).
    Miss,
    /// Joined another request's in-flight fill.
    Coalesced,
    /// A cached manifest served because upstream failed or rate-limited its revalidation.
    Stale,
    /// Forwarded without caching.
    Pass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Stale => "stale",
            CacheStatus::Pass => "pass",
        }
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A registry-style JSON error.
pub fn registry_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] }).to_string();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A plain-text response for the proxy's own endpoints and CONNECT refusals.
pub fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{message}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Errors met while serving a registry request, mapped to responses in one place.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("upstream content does not match its digest")]
    DigestMismatch,
    #[error("manifest larger than the {0}-byte limit")]
    ManifestTooLarge(u64),
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable { len: u64 },
}

impl ServeError {
    pub fn into_response(self) -> Response<Body> {
        let message = self.to_string();
        match self {
            ServeError::Upstream(UpstreamError::Timeout { .. })
            | ServeError::Upstream(UpstreamError::BodyStalled(_)) => registry_error(
                StatusCode::GATEWAY_TIMEOUT,
                "UNAVAILABLE",
                &format!("upstream registry: {message}"),
            ),
            ServeError::Upstream(_) => registry_error(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                &format!("upstream registry: {message}"),
            ),
            ServeError::DigestMismatch => {
                registry_error(StatusCode::BAD_GATEWAY, "DIGEST_INVALID", &message)
            }
            ServeError::ManifestTooLarge(_) => {
                registry_error(StatusCode::BAD_GATEWAY, "SIZE_INVALID", &message)
            }
            ServeError::RangeNotSatisfiable { len } => {
                let mut r =
                    registry_error(StatusCode::RANGE_NOT_SATISFIABLE, "SIZE_INVALID", &message);
                r.headers_mut().insert(
                    http::header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
                );
                r
            }
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and proxy credentials: never forwarded either way.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(n);
    }
}

/// What the access-log line says about a request.
pub struct LogLine {
    pub registry: crate::oci::Registry,
    pub repo: String,
    pub kind: &'static str,
    pub method: String,
    pub outcome: CacheStatus,
    pub status: u16,
    pub started: Instant,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// A response body that counts what it sends and logs the request when it ends.
pub struct Logged {
    inner: Body,
    bytes: u64,
    complete: bool,
    /// The body's exact length when known: hyper stops polling a body once it has sent
    /// `Content-Length` bytes, so reaching it counts as complete.
    expected: Option<u64>,
    line: LogLine,
    span: tracing::Span,
}

impl Logged {
    pub fn wrap(resp: Response<Body>, line: LogLine) -> Response<Body> {
        let (parts, inner) = resp.into_parts();
        // Streamed bodies carry no exact size hint; their length is in Content-Length.
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let expected = inner.size_hint().exact().or(declared);
        let body = Logged {
            inner,
            bytes: 0,
            complete: false,
            expected,
            line,
            span: tracing::Span::current(),
        };
        Response::from_parts(parts, body.boxed_unsync())
    }
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => self.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let complete =
            self.complete || self.inner.is_end_stream() || self.expected == Some(self.bytes);
        let l = &self.line;
        let _enter = self.span.enter();
        tracing::info!(
            target: "stowage::access",
            registry = %l.registry,
            repo = %l.repo,
            kind = l.kind,
            method = %l.method,
            outcome = l.outcome.as_str(),
            status = l.status,
            bytes = self.bytes,
            complete,
            duration_ms = l.started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
        use crate::metrics::{RequestLabels, SourceLabels};
        l.metrics
            .requests
            .get_or_create(&RequestLabels {
                registry: l.registry.to_string(),
                kind: l.kind.into(),
                outcome: l.outcome.as_str().into(),
            })
            .inc();
        let source = match l.outcome {
            CacheStatus::Hit | CacheStatus::Coalesced | CacheStatus::Stale => "cache",
            CacheStatus::Miss | CacheStatus::Pass => "upstream",
        };
        l.metrics
            .bytes_served
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .inc_by(self.bytes);
        let t = &l.metrics.totals;
        use std::sync::atomic::Ordering::Relaxed;
        if l.kind != "other" {
            match l.outcome {
                CacheStatus::Hit => t.hits.fetch_add(1, Relaxed),
                CacheStatus::Miss => t.misses.fetch_add(1, Relaxed),
                CacheStatus::Coalesced => t.coalesced.fetch_add(1, Relaxed),
                CacheStatus::Stale => t.stale.fetch_add(1, Relaxed),
                CacheStatus::Pass => t.passed.fetch_add(1, Relaxed),
            };
        }
        if source == "cache" {
            t.bytes_cache.fetch_add(self.bytes, Relaxed)
        } else {
            t.bytes_upstream.fetch_add(self.bytes, Relaxed)
        };
    }
}

/// A response to `HEAD` carries no body. hyper drops it on HTTP/1.1 but sends it on h2,
/// where DATA on a `HEAD` stream is a protocol error for the client; registry errors and
/// refusals are built with JSON bodies, so they are emptied here. The headers, including
/// any `Content-Length`, stay as they are.
pub fn head_without_body(method: &http::Method, resp: Response<Body>) -> Response<Body> {
    if method != http::Method::HEAD || resp.body().is_end_stream() {
        return resp;
    }
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, empty())
}

/// Sets `Content-Length` for a body of known size.
pub fn set_len(headers: &mut HeaderMap, len: u64) {
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic secret"),
        );
        h.insert("authorization", HeaderValue::from_static("Bearer t"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }

    #[test]
    fn head_responses_lose_their_body_only() {
        let r = head_without_body(
            &http::Method::HEAD,
            registry_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "no"),
        );
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert!(r.body().is_end_stream());
        let r = head_without_body(
            &http::Method::GET,
            registry_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "no"),
        );
        assert!(!r.body().is_end_stream());
    }

    #[test]
    fn errors_map_to_registry_json() {
        let r = ServeError::RangeNotSatisfiable { len: 10 }.into_response();
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(r.headers()["content-range"], "bytes */10");
        let r = ServeError::Upstream(UpstreamError::Connect {
            host: "quay.io".into(),
            message: "refused".into(),
        })
        .into_response();
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(r.headers()["content-type"], "application/json");
    }
}
