//! The forward-proxy listener (`HTTPS_PROXY`): `CONNECT`, absolute-form `http://` requests,
//! and the proxy's own endpoints.
//!
//! `CONNECT` to a registry or auth host is answered `200`, then TLS is terminated (`tls`)
//! with a leaf for the CONNECT host and the registry API is served inside. `CONNECT` to any
//! other host is a blind tunnel (or `403`); absolute-form `http://` requests to other hosts
//! obey the same rules (`other_hosts`, `tunnel_ports`) and never reach internal addresses.
//! Origin-form requests are the proxy's own endpoints.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use super::tls::{self, Choice};
use super::{connection, loop_guard, own_endpoints, tunnel, HostKind, Ingress, Listener};
use crate::http_util::{boxed, empty, text, Body};
use crate::oci::{Registry, Scheme};
use crate::registry_api::Target;
use crate::settings::OtherHosts;
use crate::telemetry::metrics::Refusal;
use crate::upstream::destination::Refused;

/// Serves one client connection to the proxy listener until it closes or shutdown ends it.
pub async fn serve_connection<IO>(ingress: Arc<Ingress>, stream: IO, peer: SocketAddr)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let this = ingress.clone();
    let svc = service_fn(move |req| {
        let ingress = this.clone();
        async move { Ok::<_, Infallible>(proxy_request(ingress, req, peer).await) }
    });
    connection::serve(
        ingress.limits,
        &ingress.shutdown,
        TokioIo::new(stream),
        svc,
        true,
    )
    .await
}

async fn proxy_request(
    ingress: Arc<Ingress>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let proxied = req.method() == Method::CONNECT || req.uri().scheme().is_some();
    if proxied {
        if let Some(users) = &ingress.proxy.users {
            if !users
                .check(req.headers().get(http::header::PROXY_AUTHORIZATION))
                .await
            {
                tracing::info!(%peer, "proxy authentication required or failed");
                ingress.api.metrics.refused(Refusal::ProxyAuth);
                let mut r = text(
                    StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                    "proxy authentication required",
                );
                r.headers_mut().insert(
                    http::header::PROXY_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"stowage\""),
                );
                return r;
            }
        }
    }
    if req.method() == Method::CONNECT {
        return connect(ingress, req, peer).await;
    }
    if req.uri().scheme().is_some() {
        return absolute_form(ingress, req, peer).await;
    }
    if let Some(r) = own_endpoints::serve(&ingress, Listener::Proxy, &req, peer).await {
        return r;
    }
    text(
        StatusCode::NOT_FOUND,
        "not found: this is Stowage, a registry proxy. Use it as HTTPS_PROXY; GET /ca.crt for its CA, /healthz for health",
    )
}

/// The CONNECT target as an HTTPS origin (normalised by `oci::origin`).
fn connect_target(req: &Request<Incoming>) -> Option<Registry> {
    Registry::from_authority(Scheme::Https, req.uri().authority()?.as_str()).ok()
}

fn loop_refused() -> Response<Body> {
    text(
        StatusCode::LOOP_DETECTED,
        "requests to this proxy's own address are refused",
    )
}

async fn connect(
    ingress: Arc<Ingress>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let Some(target) = connect_target(&req) else {
        return text(StatusCode::BAD_REQUEST, "CONNECT needs a host:port target");
    };
    let port = target.port();
    if let Some(ip) = target.host().ip() {
        if ingress.own.contains(&SocketAddr::new(ip, port)) {
            ingress.api.metrics.refused(Refusal::Loop);
            return loop_refused();
        }
    }
    let host = target.host().as_str().to_owned();
    match ingress.host_kind(target.host()) {
        Some(kind) => {
            let span = tracing::info_span!("tunnel", registry = %target, mode = "tls");
            let this = ingress.clone();
            ingress.tasks.spawn(
                async move {
                    match hyper::upgrade::on(req).await {
                        Ok(upgraded) => terminate(this, TokioIo::new(upgraded), target, kind).await,
                        Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                    }
                }
                .instrument(span),
            );
            Response::new(empty())
        }
        None => {
            if let Some(refused) = other_host_refused(&ingress, peer, "CONNECT", &host, port) {
                return refused;
            }
            // A name (or pin) that leads back to a listener of ours would turn a remote
            // client into a loopback one, the kind allowed to use /admin; loopback and
            // link-local services are not the proxy's to offer either (unless pinned).
            if let Some(refused) = destination_refused(&ingress, peer, "CONNECT", &target).await {
                return refused;
            }
            let upstream = &ingress.api.upstream;
            let stream = match upstream.connect_tcp(&host, port).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%host, port, error = %e, "tunnel connect failed");
                    return text(StatusCode::BAD_GATEWAY, &e.to_string());
                }
            };
            if stream.peer_addr().is_ok_and(|a| ingress.own.contains(&a)) {
                tracing::info!(%peer, %host, port, "CONNECT refused: connected to this proxy");
                ingress.api.metrics.refused(Refusal::Loop);
                return loop_refused();
            }
            let span = tracing::info_span!("tunnel", %host, port, mode = "blind");
            let this = ingress.clone();
            ingress.tasks.spawn(
                async move {
                    match hyper::upgrade::on(req).await {
                        Ok(upgraded) => {
                            let (up, down) = tunnel::relay(
                                TokioIo::new(upgraded),
                                stream,
                                this.limits.idle_timeout,
                                &this.shutdown,
                            )
                            .await;
                            tracing::debug!(bytes_up = up, bytes_down = down, "tunnel closed");
                        }
                        Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                    }
                }
                .instrument(span),
            );
            Response::new(empty())
        }
    }
}

/// Terminates TLS inside a CONNECT tunnel with a leaf for the CONNECT host (whatever SNI
/// says) and serves the registry API for `registry`.
async fn terminate<IO>(ingress: Arc<Ingress>, io: IO, registry: Registry, kind: HostKind)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let host = registry.host().as_str().to_owned();
    let ca = &ingress.ca;
    let choose = |sni: Option<String>| async move {
        if sni.as_deref().is_some_and(|s| s != host) {
            tracing::debug!(
                sni,
                "SNI differs from the CONNECT host; using the CONNECT host"
            );
        }
        match ca.server_config(&host).await {
            Ok(c) => Choice::Serve(c),
            Err(e) => {
                tracing::error!(error = %e, "cannot mint a certificate");
                Choice::Refuse
            }
        }
    };
    let Some(tls) = tls::accept(io, ingress.limits.header_timeout, choose).await else {
        return;
    };
    let target = Arc::new(Target {
        registry,
        auth_host: kind == HostKind::AuthHost,
        answers_challenges: false,
        account: None,
    });
    ingress.serve_registry(TokioIo::new(tls), target).await
}

/// The rules for hosts that are not registries, the same for `CONNECT` and absolute-form
/// requests: `[proxy] other_hosts = "deny"` refuses them all, and only `tunnel_ports` may
/// be reached.
fn other_host_refused(
    ingress: &Ingress,
    peer: SocketAddr,
    how: &str,
    host: &str,
    port: u16,
) -> Option<Response<Body>> {
    if ingress.proxy.other_hosts == OtherHosts::Deny {
        tracing::info!(%peer, %host, port, "{how} refused: not a registry");
        ingress.api.metrics.refused(Refusal::OtherHost);
        return Some(text(
            StatusCode::FORBIDDEN,
            "this proxy only serves container registries",
        ));
    }
    if !ingress.proxy.tunnel_ports.contains(&port) {
        tracing::info!(%peer, %host, port, "{how} refused: port not in proxy.tunnel_ports");
        ingress.api.metrics.refused(Refusal::TunnelPort);
        return Some(text(
            StatusCode::FORBIDDEN,
            "this port is not allowed for hosts that are not registries (proxy.tunnel_ports)",
        ));
    }
    None
}

/// Plain-HTTP requests in absolute form (`GET http://host/...`): registries speaking plain
/// HTTP get the registry path; anything else is refused or forwarded under the tunnel
/// rules, and never to a loopback, link-local or unspecified address or one of our own
/// listeners unless the name is pinned (`upstream::destination`): Stowage makes this
/// request itself, from this machine, which such services trust.
/// Whether a tunnel or a forwarded request to `to`, a host that is not a registry, is
/// refused by the destination rules (`Upstream::check_destination`): Stowage's own
/// listeners (508), internal addresses that no pin allows (403), names that do not resolve
/// (502).
async fn destination_refused(
    ingress: &Ingress,
    peer: SocketAddr,
    how: &str,
    to: &Registry,
) -> Option<Response<Body>> {
    let (host, port) = (to.host().as_str(), to.port());
    let uri = to.uri("/").expect("a Registry is a valid origin");
    let reason = ingress.api.upstream.check_destination(&uri).await.err()?;
    tracing::info!(%peer, %host, port, %reason, "{how} refused");
    ingress.api.metrics.refused(match reason {
        Refused::OwnListener(_) => Refusal::Loop,
        _ => Refusal::Destination,
    });
    Some(match reason {
        Refused::OwnListener(_) => loop_refused(),
        Refused::Unresolved { .. } => text(StatusCode::BAD_GATEWAY, &reason.to_string()),
        _ => text(StatusCode::FORBIDDEN, &format!("{how} refused: {reason}")),
    })
}

async fn absolute_form(
    ingress: Arc<Ingress>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let uri = req.uri();
    if uri.scheme_str() != Some("http") {
        return text(
            StatusCode::BAD_REQUEST,
            "only http:// URLs can be proxied in absolute form; use CONNECT for https",
        );
    }
    let Some(registry) = Registry::of_uri(uri) else {
        return text(StatusCode::BAD_REQUEST, "request URL has no valid host");
    };
    let kind = ingress.host_kind(registry.host());
    if kind.is_none() {
        let (host, port) = (registry.host().as_str(), registry.port());
        if let Some(refused) = other_host_refused(&ingress, peer, "forwarding", host, port) {
            return refused;
        }
        if let Some(refused) = destination_refused(&ingress, peer, "forwarding", &registry).await {
            return refused;
        }
    }
    // Forwarding to ourselves would loop, and would reach /admin as a loopback client.
    let resolver = ingress.api.upstream.resolver();
    if let Some(refused) = loop_guard::check(&ingress.own, resolver, &registry).await {
        ingress.api.metrics.refused(Refusal::Loop);
        return refused;
    }
    let target = Arc::new(Target {
        registry,
        auth_host: kind != Some(HostKind::Registry),
        answers_challenges: false,
        account: None,
    });
    ingress.api.serve(target, req.map(boxed)).await
}
