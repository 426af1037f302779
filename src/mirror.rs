//! The registry-mirror listener and the direct (SNI) listener: two more ways into the same
//! `registry::handle` path, so caching and authorization logic exist once.
//!
//! Mirror requests name their upstream in one of three ways, tried in order:
//! `?ns=<registry>` (containerd `hosts.toml`, k3s/RKE2), a path prefix
//! `/v2/<registry-host>/<name>/...` (CRI-O and podman `registries.conf`), or nothing
//! (dockerd `--registry-mirror`, Docker Hub). `ns` is stripped before going upstream, and
//! the client's `Authorization` (for the mirror's own users) never goes upstream.
//!
//! Direct TLS reads SNI from the ClientHello; no SNI, or a host that is not a registry,
//! ends the handshake. A registry name that resolves back to Stowage itself is a loop and
//! answered with `508` instead of recursing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;

use crate::oci::{Host, Registry, Scheme};
use crate::proxy::serve_until_shutdown;
use crate::registry::{self, Target};
use crate::response::{full, head_without_body, registry_error, text, Body};
use crate::server::{HostKind, State};

/// Where a mirror request goes, and the path to ask there.
#[derive(Debug, PartialEq, Eq)]
pub struct Routed {
    pub registry: Registry,
    pub path_and_query: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RouteError {
    UnknownRegistry(Registry),
    BadNamespace,
}

/// Decodes `%XX` escapes (and `+` as a space, as in form encoding); `None` for a broken
/// escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// Maps a mirror request to its upstream. `known` says whether a host may be used.
pub fn route(
    uri: &Uri,
    default_registry: &str,
    known: impl Fn(&Host) -> bool,
) -> Result<Routed, RouteError> {
    let path = uri.path();
    let mut ns = None;
    let mut rest_query = Vec::new();
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            // containerd form-encodes the value: `ns=quay.io%3A5443` for a registry with a port.
            Some(("ns", v)) => ns = Some(percent_decode(v).ok_or(RouteError::BadNamespace)?),
            _ => rest_query.push(pair),
        }
    }
    let query = if rest_query.is_empty() {
        String::new()
    } else {
        format!("?{}", rest_query.join("&"))
    };
    if let Some(ns) = ns {
        let registry =
            Registry::from_reference_domain(&ns).map_err(|_| RouteError::BadNamespace)?;
        if !known(registry.host()) {
            return Err(RouteError::UnknownRegistry(registry));
        }
        return Ok(Routed {
            registry,
            path_and_query: format!("{path}{query}"),
        });
    }
    // `/v2/<host>/<name>/...`: a first component with a dot or a port is a registry host
    // (Docker Hub organisations cannot contain dots).
    if let Some(rest) = path.strip_prefix("/v2/") {
        if let Some((first, tail)) = rest.split_once('/') {
            if first.contains('.') || first.contains(':') || first == "localhost" {
                let registry =
                    Registry::from_reference_domain(first).map_err(|_| RouteError::BadNamespace)?;
                if !known(registry.host()) {
                    return Err(RouteError::UnknownRegistry(registry));
                }
                return Ok(Routed {
                    registry,
                    path_and_query: format!("/v2/{tail}{query}"),
                });
            }
        }
    }
    let registry =
        Registry::from_reference_domain(default_registry).map_err(|_| RouteError::BadNamespace)?;
    Ok(Routed {
        registry,
        path_and_query: format!("{path}{query}"),
    })
}

async fn mirror_request(state: Arc<State>, mut req: Request<Incoming>) -> Response<Body> {
    if !state.mirror_users.is_empty() {
        let ok = req.headers().get(AUTHORIZATION).is_some_and(|given| {
            state
                .mirror_users
                .iter()
                .any(|u| constant_time_eq(u.basic().as_bytes(), given.as_bytes()))
        });
        if !ok {
            let mut r = registry_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "this mirror needs a username and password",
            );
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"stowage\""),
            );
            return r;
        }
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/v2" | "/v2/") => {
            let mut r = Response::new(full("{}"));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r.headers_mut().insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            return r;
        }
        (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok"),
        (&Method::GET, "/ca.crt") => return Response::new(full(state.ca.cert_pem().to_owned())),
        _ => {}
    }
    if !req.uri().path().starts_with("/v2/") {
        return registry_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "this is a registry mirror: only /v2/ paths are served",
        );
    }
    let any = state.config.mirror.any_registry;
    let routed = route(req.uri(), &state.config.mirror.default_registry, |h| {
        any || state.host_kind(h) == Some(HostKind::Registry)
    });
    let routed = match routed {
        Ok(r) => r,
        Err(RouteError::UnknownRegistry(h)) => {
            return registry_error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                &format!("registry {h} is not configured in this mirror; add it as [[registry]] or set [mirror] any_registry = true"),
            )
        }
        Err(RouteError::BadNamespace) => return registry_error(StatusCode::BAD_REQUEST, "NAME_INVALID", "ns or registry prefix is not a valid host"),
    };
    let Ok(uri) = routed.path_and_query.parse::<Uri>() else {
        return registry_error(
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
            "request path cannot be mapped upstream",
        );
    };
    *req.uri_mut() = uri;
    // The mirror's own credentials are for the mirror, never for upstream.
    req.headers_mut().remove(AUTHORIZATION);
    let target = Arc::new(Target {
        registry: routed.registry,
        auth_host: false,
        mirror: true,
    });
    if let Some(resp) = loop_check(&state, &target).await {
        return resp;
    }
    registry::handle(state, target, req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A clear error when `target` resolves to one of Stowage's own listeners.
pub async fn loop_check(state: &State, target: &Target) -> Option<Response<Body>> {
    let addrs = state
        .upstream
        .resolver()
        .resolve(target.registry.host().as_str(), target.registry.port())
        .await
        .ok()?;
    let own = addrs.iter().find(|a| state.is_own_address(a))?;
    tracing::error!(registry = %target.registry, address = %own, "upstream resolves to this Stowage: refusing a request loop");
    Some(registry_error(
        StatusCode::LOOP_DETECTED,
        "UNAVAILABLE",
        &format!(
            "{} resolves to this Stowage ({own}); the proxy host must resolve registries for real, or pin them in [upstream.resolve]",
            target.registry.host()
        ),
    ))
}

/// Serves one connection on the mirror listener (plain HTTP or TLS).
pub async fn serve_mirror_connection(state: Arc<State>, stream: TcpStream, _peer: SocketAddr) {
    let svc_state = state.clone();
    let svc = service_fn(move |req| {
        let state = svc_state.clone();
        async move {
            let method = req.method().clone();
            Ok::<_, Infallible>(head_without_body(&method, mirror_request(state, req).await))
        }
    });
    match state.config.mirror.tls {
        crate::config::MirrorTls::Off => {
            serve_until_shutdown(&state, TokioIo::new(stream), svc).await
        }
        _ => {
            let Some(tls) = accept_mirror_tls(&state, stream).await else {
                return;
            };
            serve_until_shutdown(&state, TokioIo::new(tls), svc).await
        }
    }
}

async fn accept_mirror_tls<IO>(state: &State, io: IO) -> Option<tokio_rustls::server::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let start = handshake_start(state, io).await?;
    let config = match &state.mirror_tls {
        Some(c) => c.clone(),
        None => {
            let name = start
                .client_hello()
                .server_name()
                .map(str::to_ascii_lowercase)
                .unwrap_or_else(|| state.config.mirror.hostname.clone());
            match state.ca.server_config(&name).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot mint the mirror's certificate");
                    return None;
                }
            }
        }
    };
    finish_handshake(state, start, config).await
}

async fn handshake_start<IO>(state: &State, io: IO) -> Option<tokio_rustls::StartHandshake<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    match tokio::time::timeout(state.header_timeout, acceptor).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "TLS ClientHello rejected");
            None
        }
        Err(_) => {
            tracing::info!("no TLS ClientHello in time");
            None
        }
    }
}

async fn finish_handshake<IO>(
    state: &State,
    start: tokio_rustls::StartHandshake<IO>,
    config: Arc<rustls::ServerConfig>,
) -> Option<tokio_rustls::server::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(state.header_timeout, start.into_stream(config)).await {
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

/// Ends a handshake that names no registry with a fatal `unrecognized_name` alert (RFC 6066),
/// so the client reports why instead of an unexpected end of stream. It goes out in the
/// clear, as every alert before the server's first flight does.
async fn refuse_unrecognized_name<IO: AsyncWrite + Unpin>(mut io: IO) {
    const ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 2, 112];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = io.write_all(&ALERT).await;
        let _ = io.shutdown().await;
    })
    .await;
}

/// Serves one connection on the direct listener: SNI names the registry.
pub async fn serve_direct_connection(state: Arc<State>, stream: TcpStream, peer: SocketAddr) {
    let Some(start) = handshake_start(&state, stream).await else {
        return;
    };
    let Some(sni) = start
        .client_hello()
        .server_name()
        .map(str::to_ascii_lowercase)
    else {
        // Without SNI there is no way to know which registry the client meant.
        tracing::warn!(%peer, "direct TLS without SNI: refused (clients must connect by registry name)");
        return refuse_unrecognized_name(start.io).await;
    };
    let Some(kind) = Host::parse(&sni).ok().and_then(|h| state.host_kind(&h)) else {
        tracing::warn!(%peer, sni, "direct TLS for a host that is not a configured registry: refused");
        return refuse_unrecognized_name(start.io).await;
    };
    let config = match state.ca.server_config(&sni).await {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "cannot mint a certificate"),
    };
    let Some(tls) = finish_handshake(&state, start, config).await else {
        return;
    };
    let port = state.config.direct.upstream_port.unwrap_or(443);
    let Ok(host) = Host::parse(&sni) else { return };
    let target = Arc::new(Target {
        registry: Registry::new(Scheme::Https, host, port),
        auth_host: kind == HostKind::AuthHost,
        mirror: false,
    });
    crate::proxy::serve_registry(state, TokioIo::new(tls), target).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(uri: &str) -> Result<Routed, RouteError> {
        let known = |h: &Host| ["registry-1.docker.io", "quay.io", "ghcr.io"].contains(&h.as_str());
        route(&uri.parse().unwrap(), "registry-1.docker.io", known)
    }

    fn ok(host: &str, port: u16, pq: &str) -> Result<Routed, RouteError> {
        Ok(Routed {
            registry: Registry::new(Scheme::Https, Host::parse(host).unwrap(), port),
            path_and_query: pq.into(),
        })
    }

    #[test]
    fn containerd_ns_is_mapped_and_stripped() {
        assert_eq!(
            r("/v2/library/alpine/manifests/3?ns=docker.io"),
            ok(
                "registry-1.docker.io",
                443,
                "/v2/library/alpine/manifests/3"
            )
        );
        assert_eq!(
            r("/v2/org/img/blobs/x?ns=quay.io&a=b"),
            ok("quay.io", 443, "/v2/org/img/blobs/x?a=b")
        );
        assert_eq!(
            r("/v2/org/img/tags/list?n=10&ns=quay.io:5443"),
            ok("quay.io", 5443, "/v2/org/img/tags/list?n=10")
        );
        assert_eq!(
            r("/v2/org/img/manifests/v1?ns=quay.io%3A5443"),
            ok("quay.io", 5443, "/v2/org/img/manifests/v1")
        );
        assert_eq!(
            r("/v2/org/img/manifests/v1?ns=quay.io%3a5443"),
            ok("quay.io", 5443, "/v2/org/img/manifests/v1")
        );
        assert_eq!(
            r("/v2/a/manifests/1?ns=quay.io%3"),
            Err(RouteError::BadNamespace)
        );
        assert_eq!(
            r("/v2/a/manifests/1?ns=quay.io%2Fx"),
            Err(RouteError::BadNamespace)
        );
        assert_eq!(
            r("/v2/a/manifests/1?ns=evil.example"),
            Err(RouteError::UnknownRegistry("evil.example".parse().unwrap()))
        );
        assert_eq!(
            r("/v2/a/manifests/1?ns=../x"),
            Err(RouteError::BadNamespace)
        );
    }

    #[test]
    fn dockerd_requests_go_to_docker_hub() {
        assert_eq!(
            r("/v2/library/alpine/manifests/latest"),
            ok(
                "registry-1.docker.io",
                443,
                "/v2/library/alpine/manifests/latest"
            )
        );
        assert_eq!(
            r("/v2/myorg/app/blobs/sha256:00"),
            ok("registry-1.docker.io", 443, "/v2/myorg/app/blobs/sha256:00")
        );
    }

    #[test]
    fn path_prefix_names_the_registry() {
        assert_eq!(
            r("/v2/ghcr.io/org/app/manifests/1"),
            ok("ghcr.io", 443, "/v2/org/app/manifests/1")
        );
        assert_eq!(
            r("/v2/docker.io/library/alpine/manifests/1"),
            ok(
                "registry-1.docker.io",
                443,
                "/v2/library/alpine/manifests/1"
            )
        );
        assert_eq!(
            r("/v2/quay.io:5443/org/app/manifests/1"),
            ok("quay.io", 5443, "/v2/org/app/manifests/1")
        );
        assert_eq!(
            r("/v2/unknown.example/org/app/manifests/1"),
            Err(RouteError::UnknownRegistry(
                "unknown.example".parse().unwrap()
            ))
        );
    }
}
