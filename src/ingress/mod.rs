//! Ways in: turning a connection into (registry, way in, request) for the registry API.
//!
//! - [`accept`]: the accept loops: allow lists, the connection limit, refusals;
//! - [`forward_proxy`]: `HTTPS_PROXY`: `CONNECT` (TLS terminated for registries, a blind
//!   [`tunnel`] or `403` otherwise) and absolute-form `http://` requests;
//! - [`mirror`]: the registry-mirror listener (`?ns=`, path prefixes, Docker Hub default);
//! - [`direct`]: TLS for hosts redirected to Stowage, SNI naming the registry;
//! - [`tls`]: the one TLS accept; [`ca`]: the local CA that mints leaves;
//! - [`own_endpoints`]: `/ca.crt`, `/healthz`, `/metrics`, `/setup/*`, `/admin/*`;
//! - [`loop_guard`]: requests that would lead back to Stowage; [`client_auth`]: who may
//!   use a listener.
//!
//! Invariant: no cache or upstream policy here. Every way in ends in
//! `RegistryApi::serve` with a `Target` built from `oci::Registry`.

pub mod accept;
pub mod ca;
pub mod client_auth;
pub mod connection;
pub mod direct;
pub mod forward_proxy;
pub mod loop_guard;
pub mod mirror;
pub mod own_endpoints;
pub mod tls;
pub mod tunnel;
pub mod workers;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use hyper::service::service_fn;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http_util::boxed;
use crate::oci::{Host, Registry};
use crate::registry_api::{RegistryApi, Target};
use crate::settings::{Config, Credentials, OtherHosts};
use crate::telemetry::metrics::Refusal;
use ca::CertificateAuthority;
use client_auth::ProxyUsers;
use connection::Limits;
use loop_guard::OwnAddresses;

/// What a host in a `CONNECT` (or SNI) is to Stowage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    Registry,
    AuthHost,
}

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Proxy,
    Mirror,
    Direct,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Proxy => "proxy",
            Listener::Mirror => "mirror",
            Listener::Direct => "direct",
        }
    }
}

/// The forward proxy's settings.
pub struct ProxySettings {
    pub other_hosts: OtherHosts,
    pub tunnel_ports: Vec<u16>,
    pub allow: Vec<ipnet::IpNet>,
    pub users: Option<Arc<ProxyUsers>>,
}

/// How the mirror listener speaks TLS.
pub enum MirrorTls {
    Off,
    /// A leaf minted from the CA for the SNI, or `hostname` without SNI.
    Ca {
        hostname: String,
    },
    /// `cert_file`/`key_file`.
    Files(Arc<rustls::ServerConfig>),
}

pub struct MirrorSettings {
    pub tls: MirrorTls,
    pub default_registry: Registry,
    pub any_registry: bool,
    /// Accounts the mirror listener accepts (empty: open).
    pub users: Vec<Credentials>,
    pub allow: Vec<ipnet::IpNet>,
}

pub struct DirectSettings {
    pub upstream_port: u16,
    pub allow: Vec<ipnet::IpNet>,
}

/// Everything the ways in use, built once by the composition root.
pub struct Ingress {
    pub api: Arc<RegistryApi>,
    pub ca: CertificateAuthority,
    /// Hosts whose TLS is terminated (port-independent: what is cached and who may read it
    /// is keyed by the whole `Registry` below this layer).
    pub catalog: HashMap<Host, HostKind>,
    pub own: OwnAddresses,
    pub limits: Limits,
    pub proxy: ProxySettings,
    pub mirror: MirrorSettings,
    pub direct: DirectSettings,
    /// For `/setup/*` snippets.
    pub config: Arc<Config>,
    /// Bounds client connections across listeners.
    pub connections: Arc<tokio::sync::Semaphore>,
    /// The threads client connections are served on (`workers`).
    pub workers: workers::Workers,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

impl Ingress {
    pub fn host_kind(&self, host: &Host) -> Option<HostKind> {
        self.catalog.get(host).copied()
    }

    /// Serves the registry API for `target` on a connection whose TLS is terminated.
    pub async fn serve_registry<IO>(self: &Arc<Self>, io: IO, target: Arc<Target>)
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let resolver = self.api.upstream.resolver().clone();
        let looped = loop_guard::check(&self.own, &resolver, &target.registry)
            .await
            .is_some();
        let this = self.clone();
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let (this, target, resolver) = (this.clone(), target.clone(), resolver.clone());
            async move {
                if looped {
                    if let Some(resp) =
                        loop_guard::check(&this.own, &resolver, &target.registry).await
                    {
                        this.api.metrics.refused(Refusal::Loop);
                        return Ok::<_, Infallible>(resp);
                    }
                }
                Ok::<_, Infallible>(this.api.serve(target, req.map(boxed)).await)
            }
        });
        connection::serve(self.limits, &self.shutdown, io, svc, false).await
    }
}
