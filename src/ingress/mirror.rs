//! The registry-mirror listener: the registry API for `dockerd --registry-mirror`,
//! containerd `hosts.toml` and k3s/RKE2 mirrors, plain HTTP or TLS.
//!
//! Mirror requests name their upstream in one of three ways, tried in order:
//! `?ns=<registry>` (containerd, k3s/RKE2), a path prefix `/v2/<registry-host>/<name>/...`
//! (CRI-O and podman `registries.conf`), or nothing (dockerd: Docker Hub, or
//! `[mirror] default_registry`). `ns` is stripped before going upstream, and the client's
//! `Authorization` (for the mirror's own users) never goes upstream.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::loop_guard::canonical_ip;
use super::tls::{self, Choice};
use super::{
    client_auth, connection, loop_guard, own_endpoints, HostKind, Ingress, Listener, MirrorTls,
};
use crate::http_util::{boxed, full, head_without_body, percent_decode, Body};
#[cfg(test)]
use crate::oci::Scheme;
use crate::oci::{Host, Registry};
use crate::registry_api::{registry_error, Target};
use crate::telemetry::metrics::Refusal;

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

/// Maps a mirror request to its upstream. `known` says whether a host may be used.
pub fn route(
    uri: &Uri,
    default_registry: &Registry,
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
    Ok(Routed {
        registry: default_registry.clone(),
        path_and_query: format!("{path}{query}"),
    })
}

async fn mirror_request(
    ingress: Arc<Ingress>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    if !client_auth::mirror_user_ok(&ingress.mirror.users, req.headers()) {
        ingress.api.metrics.refused(Refusal::MirrorAuth);
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
    if matches!(*req.method(), Method::GET | Method::HEAD)
        && matches!(req.uri().path(), "/v2" | "/v2/")
    {
        let mut r = Response::new(full("{}"));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r.headers_mut().insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
        return r;
    }
    if let Some(r) = own_endpoints::serve(&ingress, Listener::Mirror, &req, peer).await {
        return r;
    }
    if !req.uri().path().starts_with("/v2/") {
        return registry_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "this is a registry mirror: only /v2/ paths are served",
        );
    }
    let any = ingress.mirror.any_registry;
    let routed = route(req.uri(), &ingress.mirror.default_registry, |h| {
        any || ingress.host_kind(h) == Some(HostKind::Registry)
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
    let resolver = ingress.api.upstream.resolver();
    if let Some(resp) = loop_guard::check(&ingress.own, resolver, &routed.registry).await {
        ingress.api.metrics.refused(Refusal::Loop);
        return resp;
    }
    let target = Arc::new(Target {
        registry: routed.registry,
        auth_host: false,
        answers_challenges: true,
        account: None,
    });
    ingress.api.serve(target, req.map(boxed)).await
}

/// Whether the mirror's `tls = "ca"` mints a leaf for `name` (the SNI): the mirror's
/// `hostname`, `localhost` when the client connected over loopback (the recipes' node-local
/// mirror), a configured registry host, or the address the client connected to. Any other
/// name would be a leaf the whole CA vouches for, handed to whoever asks.
fn mints_for(ingress: &Ingress, hostname: &str, local_ip: Option<IpAddr>, name: &str) -> bool {
    if name == hostname {
        return true;
    }
    if name == "localhost" {
        return local_ip.is_some_and(|ip| ip.is_loopback());
    }
    let Ok(host) = Host::parse(name) else {
        return false;
    };
    match host.ip() {
        Some(ip) => local_ip == Some(canonical_ip(ip)),
        None => ingress.host_kind(&host) == Some(HostKind::Registry),
    }
}

/// Serves one connection on the mirror listener (plain HTTP or TLS); `local` is the address
/// the client connected to (`tls = "ca"` mints for it).
pub async fn serve_connection<IO>(
    ingress: Arc<Ingress>,
    stream: IO,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let this = ingress.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let ingress = this.clone();
        async move {
            let method = req.method().clone();
            Ok::<_, Infallible>(head_without_body(
                &method,
                mirror_request(ingress, req, peer).await,
            ))
        }
    });
    let (limits, shutdown) = (ingress.limits, &ingress.shutdown);
    let local_ip = local.map(|a| canonical_ip(a.ip()));
    let choose = |sni: Option<String>| async {
        match &ingress.mirror.tls {
            MirrorTls::Files(c) => Choice::Serve(c.clone()),
            MirrorTls::Ca { hostname } => {
                // No SNI: the client connected by IP (clients send SNI for every name), so
                // the leaf names the address it reached, which it checks as an IP SAN.
                let name = sni
                    .or_else(|| {
                        local_ip
                            .filter(|ip| !ip.is_unspecified())
                            .map(|ip| ip.to_string())
                    })
                    .unwrap_or_else(|| hostname.clone());
                if !mints_for(&ingress, hostname, local_ip, &name) {
                    tracing::warn!(%peer, sni = name, "mirror TLS for a name that is not the mirror's: refused");
                    return Choice::Refuse;
                }
                match ingress.ca.server_config(&name).await {
                    Ok(c) => Choice::Serve(c),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot mint the mirror's certificate");
                        Choice::Refuse
                    }
                }
            }
            MirrorTls::Off => unreachable!("plain mirrors do not accept TLS"),
        }
    };
    if let MirrorTls::Off = ingress.mirror.tls {
        return connection::serve(limits, shutdown, TokioIo::new(stream), svc, false).await;
    }
    let Some(tls) = tls::accept(stream, limits.header_timeout, choose).await else {
        return;
    };
    connection::serve(limits, shutdown, TokioIo::new(tls), svc, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(uri: &str) -> Result<Routed, RouteError> {
        let known = |h: &Host| ["registry-1.docker.io", "quay.io", "ghcr.io"].contains(&h.as_str());
        route(
            &uri.parse().unwrap(),
            &"registry-1.docker.io".parse().unwrap(),
            known,
        )
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
