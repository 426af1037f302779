//! The direct listener: TLS for registry hosts redirected to Stowage by `/etc/hosts` or
//! DNS. SNI names the registry (no SNI, or a host that is not a registry, ends the
//! handshake with `unrecognized_name`); the upstream is that host on
//! `[direct] upstream_port`. A name that resolves back to Stowage is a loop, answered 508.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::tls::{self, Choice};
use super::{HostKind, Ingress};
use crate::oci::{Host, Registry, Scheme};
use crate::registry_api::Target;

/// Serves one connection on the direct listener.
pub async fn serve_connection<IO>(ingress: Arc<Ingress>, stream: IO, peer: SocketAddr)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let chosen = std::sync::Mutex::new(None::<(Host, HostKind)>);
    let choose = |sni: Option<String>| {
        let chosen = &chosen;
        let ingress = &ingress;
        async move {
            // Without SNI there is no way to know which registry the client meant.
            let Some(sni) = sni else {
                tracing::warn!(%peer, "direct TLS without SNI: refused (clients must connect by registry name)");
                return Choice::Refuse;
            };
            let Some((host, kind)) = Host::parse(&sni)
                .ok()
                .and_then(|h| ingress.host_kind(&h).map(|k| (h, k)))
            else {
                tracing::warn!(%peer, sni, "direct TLS for a host that is not a configured registry: refused");
                return Choice::Refuse;
            };
            match ingress.ca.server_config(host.as_str()).await {
                Ok(c) => {
                    *chosen.lock().expect("chosen") = Some((host, kind));
                    Choice::Serve(c)
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot mint a certificate");
                    Choice::Refuse
                }
            }
        }
    };
    let tls = tls::accept(stream, ingress.limits.header_timeout, choose).await;
    let (Some(tls), Some((host, kind))) = (tls, chosen.into_inner().expect("chosen")) else {
        return;
    };
    let target = Arc::new(Target {
        registry: Registry::new(Scheme::Https, host, ingress.direct.upstream_port),
        auth_host: kind == HostKind::AuthHost,
        answers_challenges: false,
        account: None,
    });
    ingress.serve_registry(TokioIo::new(tls), target).await;
}
