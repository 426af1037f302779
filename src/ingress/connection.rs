//! Serving HTTP/1.1 and h2 on one accepted (or TLS-terminated) connection, with the
//! limits every listener shares, until the peer closes or shutdown asks it to finish.

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::http_util::Body;

/// Spawns hyper's background tasks (one per h2 stream) inside the span of the connection
/// that made them, so their log lines, the access log included, name the client.
#[derive(Clone)]
pub struct SpanExecutor(tracing::Span);

impl<F> hyper::rt::Executor<F> for SpanExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut.instrument(self.0.clone()));
    }
}

/// Per-connection limits, from `[proxy]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time a client has to send a request's headers or finish a TLS handshake.
    pub header_timeout: Duration,
    /// A client connection idle this long is closed.
    pub idle_timeout: Duration,
}

/// The HTTP/1.1 + h2 server settings every listener uses; call it inside the connection's
/// span.
pub fn http_builder(limits: Limits) -> auto::Builder<SpanExecutor> {
    let mut b = auto::Builder::new(SpanExecutor(tracing::Span::current()));
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.idle_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20);
    b
}

/// Serves `svc` on `io` until the peer closes or `shutdown` fires (then gracefully).
/// `upgrades` allows `CONNECT` (the forward proxy).
pub async fn serve<IO, S>(
    limits: Limits,
    shutdown: &CancellationToken,
    io: IO,
    svc: S,
    upgrades: bool,
) where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = http_builder(limits);
    let result = if upgrades {
        let conn = builder.serve_connection_with_upgrades(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let conn = builder.serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
