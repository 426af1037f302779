//! Protocol hygiene shared by every layer: the one response body type, small response
//! builders, hop-by-hop header removal, `HEAD` bodies, and header names. Nothing here
//! knows about registries, the cache or upstream policy.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body Stowage sends or receives once it leaves hyper: client responses, upstream
/// requests and responses, cache reads.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A body that is already in memory and ends at once.
pub fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
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

/// Why [`collect_limited`] stopped.
#[derive(Debug)]
pub enum CollectError {
    /// The body is longer than the limit.
    TooLarge,
    /// The body failed.
    Body(String),
    /// The body sent nothing for this long (see [`IdleTimeout`]).
    Stalled(std::time::Duration),
}

/// Reads a whole body into memory, refusing one longer than `limit` bytes as soon as it
/// passes the limit (no more is buffered).
pub async fn collect_limited(mut body: Body, limit: usize) -> Result<Bytes, CollectError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match e.downcast_ref::<BodyStalled>() {
            Some(BodyStalled(d)) => CollectError::Stalled(*d),
            None => CollectError::Body(e.to_string()),
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(CollectError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// `Warning: 110`: an answer from the cache that upstream could not confirm (RFC 7234).
pub fn stale_warning() -> HeaderValue {
    HeaderValue::from_static("110 stowage \"Response is Stale\"")
}

/// Decodes `%XX` escapes (and `+` as a space, as in form encoding); `None` for a broken
/// escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                // Two hex digits exactly: `from_str_radix` alone also takes a sign ("%+A").
                let hex = [bytes.next()?, bytes.next()?];
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_error() -> Response<Body> {
        let mut r = Response::new(full("{}"));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }

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
    fn percent_escapes_need_two_hex_digits() {
        // Found by fuzz/headers: `%+A` decoded to a newline.
        assert_eq!(
            percent_decode("quay.io%3A5443").as_deref(),
            Some("quay.io:5443")
        );
        assert_eq!(percent_decode("a%2fb+c").as_deref(), Some("a/b c"));
        for bad in ["%+A", "%+1", "%-1", "% 1", "%3", "%zz", "%%41"] {
            assert_eq!(percent_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn head_responses_lose_their_body_only() {
        let r = head_without_body(&http::Method::HEAD, json_error());
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert!(r.body().is_end_stream());
        let r = head_without_body(&http::Method::GET, json_error());
        assert!(!r.body().is_end_stream());
    }

    /// A body whose frames come from `rx`, one per message; it ends when `rx` closes.
    fn channel_body(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Body {
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok::<_, BoxError>(http_body::Frame::data(chunk)), rx))
        });
        http_body_util::StreamBody::new(stream).boxed_unsync()
    }

    fn is_stalled(frame: Option<Result<http_body::Frame<Bytes>, BoxError>>) -> bool {
        matches!(frame, Some(Err(e)) if e.is::<BodyStalled>())
    }

    #[tokio::test]
    async fn an_idle_body_fails_and_each_frame_moves_the_deadline() {
        let idle = std::time::Duration::from_millis(200);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut body = IdleTimeout::new(channel_body(rx), idle);
        let t0 = tokio::time::Instant::now();
        for _ in 0..3 {
            tokio::time::sleep(idle / 2).await;
            tx.send(Bytes::from_static(b"x")).await.unwrap();
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        // 1.5 × idle without failing: every frame gave the body another `idle`.
        assert!(is_stalled(body.frame().await));
        assert!(t0.elapsed() >= idle / 2 * 3 + idle, "{:?}", t0.elapsed());
    }

    /// The head arrives on one runtime (a connection thread) and the body is read on
    /// another after the first has shut down (a fill on the shared runtime): the timer
    /// belongs to the runtime that waits, so the stall is reported, not a panic.
    #[test]
    fn a_body_made_on_a_runtime_that_is_gone_still_times_out() {
        let idle = std::time::Duration::from_millis(50);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut body = first.block_on(async { IdleTimeout::new(channel_body(rx), idle) });
        drop(first);
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let frame = second.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), body.frame()).await
        });
        assert!(is_stalled(frame.expect("the stall within 5 s")));
        drop(tx);
    }
}

/// The whole object's size from the answer to a `Range: bytes=0-0` request: the total in
/// `Content-Range` of a `206`, or `Content-Length` of a `200` (the range ignored); `None`
/// for any other status or a missing or malformed header.
pub fn size_from_ranged_answer<B>(resp: &http::Response<B>) -> Option<u64> {
    let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok());
    match resp.status() {
        http::StatusCode::PARTIAL_CONTENT => header(http::header::CONTENT_RANGE)?
            .rsplit_once('/')?
            .1
            .trim()
            .parse()
            .ok(),
        http::StatusCode::OK => header(http::header::CONTENT_LENGTH)?.trim().parse().ok(),
        _ => None,
    }
}

/// A body that fails once `idle` passes without a frame, so no peer can hold a task and
/// its connection forever by going silent after the head.
///
/// The timer is made on the first wait, in the runtime of the task that polls: an upstream
/// response arrives on the connection thread that sent the request (`ingress::workers`),
/// but its fill reads the body on the shared runtime and may outlive that thread, so a
/// timer made with the head would belong to a runtime that can be gone.
pub struct IdleTimeout<B> {
    inner: B,
    idle: std::time::Duration,
    /// `idle` after the head, or after the last frame.
    deadline: tokio::time::Instant,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: std::time::Duration) -> IdleTimeout<B> {
        IdleTimeout {
            inner,
            idle,
            deadline: tokio::time::Instant::now() + idle,
            timer: None,
        }
    }
}

/// The error an [`IdleTimeout`] body ends with.
#[derive(Debug, thiserror::Error)]
#[error("body stalled: nothing for {0:?}")]
pub struct BodyStalled(pub std::time::Duration);

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if frame.is_some() {
                    this.deadline = tokio::time::Instant::now() + this.idle;
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let deadline = this.deadline;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(this.idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
