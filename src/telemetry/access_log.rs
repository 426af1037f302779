//! The per-request outcome and the access-log line.
//!
//! `CacheStatus` names how a request was served; its `as_str()` feeds the log line, the
//! metric label and the `X-Cache` header. The `Logged` body emits the access-log line (and
//! counts the request) when the response body is finished or dropped, so the line carries
//! the bytes really sent.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::http_util::{Body, BoxError};

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
    /// Refused by a repository filter (`[[registry]] allow` / `deny`): nothing fetched.
    Denied,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Stale => "stale",
            CacheStatus::Pass => "pass",
            CacheStatus::Denied => "denied",
        }
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
    pub metrics: std::sync::Arc<crate::telemetry::metrics::Metrics>,
}

/// Milliseconds to the microsecond, as a log field: `0.129`, not `0.12923300000000001`.
pub fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// A response body that counts what it sends and logs the request when it ends.
pub struct Logged {
    inner: Body,
    bytes: u64,
    complete: bool,
    /// The body's exact length when known: hyper stops polling a body once it has sent
    /// `Content-Length` bytes, so reaching it counts as complete.
    expected: Option<u64>,
    /// From the request's arrival to its response head being ready to send.
    first_byte: std::time::Duration,
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
            first_byte: line.started.elapsed(),
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
            duration_ms = millis(l.started.elapsed()),
            "request"
        );
        use crate::telemetry::metrics::{
            code_label, LatencyLabels, Refusal, RequestLabels, SourceLabels,
        };
        let registry = l.metrics.registry_label(&l.registry);
        l.metrics.history.request(
            crate::clock::now_ms(),
            &registry,
            &l.repo,
            l.outcome,
            self.bytes,
        );
        l.metrics
            .requests
            .get_or_create(&RequestLabels {
                registry,
                kind: l.kind,
                outcome: l.outcome.as_str(),
                code: code_label(l.status),
            })
            .inc();
        let latency = LatencyLabels {
            kind: l.kind,
            outcome: l.outcome.as_str(),
        };
        l.metrics
            .request_first_byte
            .get_or_create(&latency)
            .observe(self.first_byte.as_secs_f64());
        l.metrics
            .request_duration
            .get_or_create(&latency)
            .observe(l.started.elapsed().as_secs_f64());
        if l.outcome == CacheStatus::Denied {
            l.metrics.refused(Refusal::Repository);
        }
        let source = match l.outcome {
            CacheStatus::Hit
            | CacheStatus::Coalesced
            | CacheStatus::Stale
            | CacheStatus::Denied => "cache",
            CacheStatus::Miss | CacheStatus::Pass => "upstream",
        };
        l.metrics
            .bytes_served
            .get_or_create(&SourceLabels { source })
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
                CacheStatus::Denied => 0,
            };
        }
        if source == "cache" {
            t.bytes_cache.fetch_add(self.bytes, Relaxed)
        } else {
            t.bytes_upstream.fetch_add(self.bytes, Relaxed)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_logged_to_the_microsecond() {
        let d = std::time::Duration::from_nanos(129_233);
        assert_eq!(millis(d).to_string(), "0.129");
        assert_eq!(
            millis(std::time::Duration::from_millis(1500)).to_string(),
            "1500"
        );
    }
}
