//! The one TLS accept for every listener that terminates TLS (CONNECT tunnels to
//! registries, the mirror with `tls = "ca" | "files"`, direct SNI): read the ClientHello
//! within the header timeout, let the caller choose a server config from SNI, finish the
//! handshake within the same bound. A ClientHello the caller refuses gets a fatal
//! `unrecognized_name` alert (RFC 6066) so the client reports why.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

/// What to do with a ClientHello.
pub enum Choice {
    /// Finish the handshake with this config.
    Serve(Arc<rustls::ServerConfig>),
    /// End it with `unrecognized_name`.
    Refuse,
}

/// Accepts TLS on `io`: `choose` gets the ClientHello's SNI (lowercased, if any).
pub async fn accept<IO, F, Fut>(io: IO, timeout: Duration, choose: F) -> Option<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(Option<String>) -> Fut,
    Fut: Future<Output = Choice>,
{
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout(timeout, acceptor).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "TLS ClientHello rejected");
            return None;
        }
        Err(_) => {
            tracing::info!("no TLS ClientHello in time");
            return None;
        }
    };
    let sni = start
        .client_hello()
        .server_name()
        .map(str::to_ascii_lowercase);
    let config = match choose(sni).await {
        Choice::Serve(c) => c,
        Choice::Refuse => {
            refuse_unrecognized_name(start.io).await;
            return None;
        }
    };
    match tokio::time::timeout(timeout, start.into_stream(config)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!("TLS handshake timed out");
            None
        }
    }
}

/// Ends a handshake with a fatal `unrecognized_name` alert. It goes out in the clear, as
/// every alert before the server's first flight does.
async fn refuse_unrecognized_name<IO: AsyncWrite + Unpin>(mut io: IO) {
    const ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 2, 112];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = io.write_all(&ALERT).await;
        let _ = io.shutdown().await;
    })
    .await;
}
