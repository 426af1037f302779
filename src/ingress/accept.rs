//! The accept loops: one per listener, each connection in its own task. Allow lists and
//! the connection limit are checked here, before any byte is read; refused HTTP clients get
//! a short answer (`/healthz` excepted from the allow lists, so that probes work from
//! anywhere), refused TLS clients a close.
//!
//! Every accepted connection has a first-byte deadline (`[proxy] header_timeout`): one
//! that sends nothing by then is closed, so silent connections hold a place under
//! `max_connections` for no longer than that. hyper's own header timeout starts only once
//! a request has begun, and its HTTP/1.1-or-h2 detection waits for bytes without a bound.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::{client_auth, direct, forward_proxy, mirror, Ingress, Listener};
use crate::telemetry::metrics::{Metrics, Refusal};

/// Accepts connections on one listener until shutdown.
pub async fn run(ingress: Arc<Ingress>, kind: Listener, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = ingress.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let allow = match kind {
                    Listener::Proxy => &ingress.proxy.allow,
                    Listener::Mirror => &ingress.mirror.allow,
                    Listener::Direct => &ingress.direct.allow,
                };
                if !client_auth::allowed(allow, peer.ip()) {
                    // Counted when refused: a health probe from outside is not a refusal.
                    let metrics = ingress.api.metrics.clone();
                    if kind != Listener::Direct {
                        ingress.tasks.spawn(refuse_all_but_health(
                            stream,
                            peer,
                            kind,
                            ingress.limits.header_timeout.min(PROBE_DEADLINE),
                            metrics,
                        ));
                    } else {
                        metrics.refused(Refusal::AllowList);
                        tracing::info!(%peer, listener = kind.as_str(), "client not in the allow list: refused");
                    }
                    continue;
                }
                let Ok(permit) = ingress.connections.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached: refused");
                    ingress.api.metrics.refused(Refusal::ConnectionLimit);
                    if kind != Listener::Direct {
                        ingress.tasks.spawn(refuse(
                            stream,
                            "503 Service Unavailable",
                            "too many connections",
                        ));
                    } else {
                        let _ = stream.shutdown().await;
                    }
                    continue;
                };
                let this = ingress.clone();
                let conn = move |stream: TcpStream| async move {
                    if !first_byte(&stream, this.limits.header_timeout, &this.shutdown).await {
                        tracing::debug!(%peer, listener = kind.as_str(), "no first byte in time: closed");
                        return;
                    }
                    match kind {
                        Listener::Proxy => {
                            forward_proxy::serve_connection(this, stream, peer)
                                .instrument(tracing::info_span!("conn", %peer))
                                .await
                        }
                        Listener::Mirror => {
                            let local = stream.local_addr().ok();
                            mirror::serve_connection(this, stream, peer, local)
                                .instrument(tracing::info_span!("mirror", %peer))
                                .await
                        }
                        Listener::Direct => {
                            direct::serve_connection(this, stream, peer)
                                .instrument(tracing::info_span!("direct", %peer))
                                .await
                        }
                    }
                    drop(permit);
                };
                ingress.workers.spawn(&ingress.tasks, stream, conn);
            }
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Waits until `stream` has a byte to read (peeked, so nothing is lost for hyper or the
/// TLS acceptor); false when none comes within `deadline`, the peer closes first, or
/// shutdown begins.
async fn first_byte(
    stream: &TcpStream,
    deadline: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    let mut b = [0u8; 1];
    tokio::select! {
        r = tokio::time::timeout(deadline, stream.peek(&mut b)) => matches!(r, Ok(Ok(n)) if n > 0),
        () = shutdown.cancelled() => false,
    }
}

/// How long a client outside the allow list has to send its request: probes send at once,
/// and these connections hold no `max_connections` slot (outsiders must not be able to take
/// the slots of allowed clients), so they are kept short instead.
const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// The largest request head a client outside the allow list may send: enough for a
/// health probe's `GET /healthz` and its few headers.
const PROBE_HEAD_LIMIT: usize = 4096;

/// A client outside the allow list: `GET`/`HEAD /healthz` is answered (a liveness probe
/// comes from wherever the kubelet runs, often outside the networks allowed to pull), every
/// other request gets 403, and the connection is closed either way. One request, read within
/// `deadline`; nothing else of Stowage is reached.
async fn refuse_all_but_health(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    kind: Listener,
    deadline: Duration,
    metrics: Arc<Metrics>,
) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let read = tokio::time::timeout(deadline, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < PROBE_HEAD_LIMIT {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    let health = read.is_ok() && is_health_probe(line);
    if health {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                .await;
            let _ = stream.shutdown().await;
        })
        .await;
        return;
    }
    tracing::info!(%peer, listener = kind.as_str(), "client not in the allow list: refused");
    metrics.refused(Refusal::AllowList);
    refuse(
        stream,
        "403 Forbidden",
        "your address may not use this proxy",
    )
    .await;
}

/// `GET /healthz HTTP/1.x` or `HEAD` (a query allowed, as probes may add one).
fn is_health_probe(request_line: &[u8]) -> bool {
    let Ok(line) = std::str::from_utf8(request_line) else {
        return false;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    matches!(method, "GET" | "HEAD")
        && target.split('?').next() == Some("/healthz")
        && version.starts_with("HTTP/1.")
}

/// Answers a refused HTTP client with a short response and closes.
async fn refuse(mut stream: TcpStream, status: &str, message: &str) {
    let body = format!("{message}\n");
    let resp = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_health_probe_passes_the_allow_list() {
        for ok in [
            &b"GET /healthz HTTP/1.1"[..],
            b"HEAD /healthz HTTP/1.0",
            b"GET /healthz?probe=1 HTTP/1.1",
        ] {
            assert!(is_health_probe(ok), "{}", String::from_utf8_lossy(ok));
        }
        for no in [
            &b"GET /metrics HTTP/1.1"[..],
            b"GET /healthz/../admin/prune HTTP/1.1",
            b"POST /healthz HTTP/1.1",
            b"CONNECT quay.io:443 HTTP/1.1",
            b"GET http://quay.io/healthz HTTP/1.1",
            b"GET /healthz HTTP/1.1 extra",
            b"GET /healthzz HTTP/1.1",
            b"",
        ] {
            assert!(!is_health_probe(no), "{}", String::from_utf8_lossy(no));
        }
    }
}
