//! The accept loops: one per listener, each connection in its own task. Allow lists and
//! the connection limit are checked here, before any byte is read; refused HTTP clients get
//! a short answer, refused TLS clients a close.
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
                    tracing::info!(%peer, listener = kind.as_str(), "client not in the allow list: refused");
                    if kind != Listener::Direct {
                        ingress.tasks.spawn(refuse(
                            stream,
                            "403 Forbidden",
                            "your address may not use this proxy",
                        ));
                    }
                    continue;
                }
                let Ok(permit) = ingress.connections.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached: refused");
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
                let conn = async move {
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
                ingress.tasks.spawn(conn);
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
