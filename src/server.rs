//! The composition root: the only place that knows every layer.
//!
//! `Server::bind` does everything that can fail at start-up (config checks, CA, cache,
//! upstream TLS roots, binding) and builds each layer's context from validated settings:
//! the cache, the upstream client, the access policy, the registry API, the ways in. `run`
//! only serves: it stops accepting when its shutdown future resolves, asks every
//! connection to finish, and waits for in-flight work (fills included) up to
//! `[proxy] shutdown_grace`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::Access;
use crate::cache::shared_tier::{Backend, FsBackend, S3Backend};
use crate::cache::{BlobStore, Cache, Limits, StoreError};
use crate::ingress::ca::{CaError, CertificateAuthority, NameScope};
use crate::ingress::client_auth::ProxyUsers;
use crate::ingress::loop_guard::OwnAddresses;
use crate::ingress::{
    connection, DirectSettings, HostKind, Ingress, Listener, MirrorSettings, MirrorTls,
    ProxySettings,
};
use crate::oci::Registry;
use crate::registry_api::{Accounts, RegistryApi, Rules};
use crate::settings::{self, AuthCheck, BackendKind, Config, ConfigError};
use crate::telemetry::Metrics;
use crate::upstream::token_auth::Account;
use crate::upstream::{Offline, Transport, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Upstream(String),
    #[error("starting the connection threads: {0}")]
    Workers(std::io::Error),
    /// Says which listener (`[mirror] listen 127.0.0.1:5000: ...`), in words, without the
    /// `io::Error` again as a cause.
    #[error("[{}] listen {addr}: {}", listener.as_str(), bind_reason(error))]
    Bind {
        listener: Listener,
        addr: SocketAddr,
        error: std::io::Error,
    },
}

fn bind_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::AddrInUse => "address already in use (another process listens there)".into(),
        ErrorKind::AddrNotAvailable => {
            "address not available (no interface of this host has it)".into()
        }
        ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)".into()
        }
        _ => e.to_string(),
    }
}

pub struct Server {
    ingress: Arc<Ingress>,
    listeners: Vec<(Listener, TcpListener)>,
    grace: Duration,
}

/// Pending connections the kernel queues per listener before Stowage accepts them
/// (capped by `net.core.somaxconn`). tokio's default of 1024 overflowed when 10,000 clients
/// connected at once on a busy 2-core box (bench/LOAD.md); a burst of nodes starting
/// together looks the same.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(listener: Listener, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let bind_error = |error| Error::Bind {
        listener,
        addr,
        error,
    };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(addr).map_err(bind_error)?;
    let l = socket.listen(LISTEN_BACKLOG).map_err(bind_error)?;
    let local = l.local_addr().map_err(bind_error)?;
    Ok((l, local))
}

fn load_tls_files(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    use rustls_pki_types::pem::PemObject;
    let bad = |m: String| {
        Error::Config(ConfigError::Invalid {
            key: "mirror.cert_file".into(),
            message: m,
        })
    };
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(format!("{}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("{}: {e}", cert.display())))?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| bad(format!("{}: {e}", key.display())))?;
    let config =
        crate::ingress::ca::server_tls_config(chain, key).map_err(|e| bad(e.to_string()))?;
    Ok(Arc::new(config))
}

/// The local CA of `[ca] dir`, made with name constraints when `[ca] name_constraints` is
/// on: the configured registries, their auth hosts, the mirror's hostname and `localhost`.
pub fn open_ca(config: &Config) -> Result<CertificateAuthority, CaError> {
    if !config.ca.name_constraints {
        return CertificateAuthority::open(&config.ca.dir, None);
    }
    let mut names = Vec::new();
    for r in config.registries() {
        names.push(r.registry().host().as_str().to_owned());
        names.extend(
            r.auth_origins()
                .iter()
                .map(|a| a.host().as_str().to_owned()),
        );
    }
    if !config.mirror.hostname.is_empty() {
        names.push(config.mirror.hostname.clone());
    }
    names.push("localhost".to_owned());
    let scope = NameScope::of(names.iter().map(String::as_str));
    CertificateAuthority::open(&config.ca.dir, Some(&scope))
}

/// Which hosts get their TLS terminated, and the configured accounts by exact registry.
fn catalog_and_accounts(
    config: &Config,
) -> Result<(HashMap<crate::oci::Host, HostKind>, Accounts), Error> {
    let mut hosts = HashMap::new();
    let mut accounts = Accounts::default();
    let registries = config.registries();
    for (i, r) in registries.iter().enumerate() {
        for a in r.auth_origins() {
            hosts.insert(a.host().clone(), HostKind::AuthHost);
            accounts.auth_hosts.entry(a).or_default().push(r.registry());
        }
        let index = config
            .registry
            .iter()
            .position(|c| c.registry() == r.registry())
            .unwrap_or(i);
        if let Some(c) = r.credentials(index)? {
            tracing::info!(registry = %r.registry(), username = %c.username, "using configured upstream credentials");
            let account = Account::new(c, r.registry(), r.auth_origins());
            if r.inject() {
                for a in r.auth_origins() {
                    accounts.inject.insert(a, account.clone());
                }
            }
            accounts.credentials.insert(r.registry(), account);
        }
    }
    for r in &registries {
        hosts.insert(r.registry().host().clone(), HostKind::Registry);
    }
    Ok((hosts, accounts))
}

impl Server {
    pub async fn bind(config: Config) -> Result<Server, Error> {
        Server::bind_inner(config, None).await
    }

    /// [`Server::bind`], with every upstream request carried by `transport` instead of the
    /// network: for in-process harnesses (the fuzz targets in `fuzz/`). Names still resolve
    /// through `[upstream.resolve]` pins or DNS (the loop guard and the redirect checks).
    pub async fn bind_with_transport(
        config: Config,
        transport: Arc<dyn Transport>,
    ) -> Result<Server, Error> {
        Server::bind_inner(config, Some(transport)).await
    }

    async fn bind_inner(
        config: Config,
        transport: Option<Arc<dyn Transport>>,
    ) -> Result<Server, Error> {
        // aws-lc seeds its random generator from CPU jitter on first use: ~100 ms that the
        // first client's TLS handshake (and leaf key) would otherwise wait for. Done before
        // any listener exists, so no client can arrive during it.
        let mut seed = [0u8; 16];
        let _ = aws_lc_rs::rand::fill(&mut seed);
        config.validate()?;
        let proxy_listen = config.proxy_listen()?;
        let ca = open_ca(&config)?;
        let store = {
            let dir = config.cache.dir.clone();
            tokio::task::spawn_blocking(move || BlobStore::open(&dir))
                .await
                .expect("store open task")?
        };
        tracing::info!(
            objects = store.index.len(),
            bytes = store.index.total(),
            "cache opened"
        );
        let (catalog, accounts) = catalog_and_accounts(&config)?;
        let metrics = Arc::new(Metrics::new(catalog.keys().cloned()));
        let registries: Vec<Registry> = config.registries().iter().map(|r| r.registry()).collect();
        metrics.start_at_zero(&registries, config.proxy.max_connections);
        let upstream = Arc::new(match transport {
            Some(t) => Upstream::with_transport(&config.upstream, t, Some(metrics.clone())),
            None => {
                Upstream::new(&config.upstream, Some(metrics.clone())).map_err(Error::Upstream)?
            }
        });
        let shared: Option<Arc<dyn Backend>> = match config.storage.backend {
            BackendKind::Local => None,
            BackendKind::Dir => Some(Arc::new(FsBackend::new(
                config.storage.dir.clone().expect("validated"),
            ))),
            BackendKind::S3 => Some(Arc::new(
                S3Backend::new(&config.storage, upstream.clone()).map_err(Error::Upstream)?,
            )),
        };
        if let Some(b) = &shared {
            tracing::info!(store = %b.describe(), "shared blob tier enabled");
        }
        let cache = Arc::new(Cache::new(
            store.clone(),
            shared,
            Limits {
                max_size: config.cache.max_size.0,
                min_free: config.cache.min_free.0,
                max_manifest_size: config.cache.max_manifest_size.0,
                max_concurrent_fills: config.cache.max_concurrent_fills,
            },
        ));
        if config.cache.auth_check == AuthCheck::None {
            tracing::warn!("cache.auth_check = \"none\": every cached object is served to anyone who reaches the proxy");
        }
        let access = Arc::new(Access::new(
            store,
            config.cache.auth_check,
            config.cache.offline,
            config.cache.auth_ttl.0,
            config.cache.public_ttl.0,
        ));
        let tasks = TaskTracker::new();
        // Offline, registry requests go nowhere (the shared tier above keeps the real client):
        // every answer is the one an unreachable upstream gets.
        let registries = if config.cache.offline {
            tracing::info!("[cache] offline = true: no request goes to any registry");
            Arc::new(Upstream::with_transport(
                &config.upstream,
                Arc::new(Offline),
                Some(metrics.clone()),
            ))
        } else {
            upstream
        };
        let api = Arc::new(RegistryApi::new(
            cache,
            registries,
            access,
            metrics,
            accounts,
            Rules {
                tag_ttl: config.tag_ttls(),
                negative_ttl: config.cache.negative_ttl.0,
                filters: config.repo_filters(),
                quota_reserve: config.upstream.quota_reserve.0,
            },
            tasks.clone(),
        ));

        let mut listeners = Vec::new();
        let mut own = OwnAddresses::default();
        let (l, local) = bind(Listener::Proxy, proxy_listen).await?;
        listeners.push((Listener::Proxy, l));
        own.listeners.push(local);
        if let Some(a) = config.mirror_listen()? {
            let (l, local) = bind(Listener::Mirror, a).await?;
            listeners.push((Listener::Mirror, l));
            own.listeners.push(local);
        }
        if let Some(a) = config.direct_listen()? {
            let (l, local) = bind(Listener::Direct, a).await?;
            listeners.push((Listener::Direct, l));
            own.listeners.push(local);
        }
        api.upstream.set_own_listeners(own.clone());
        let mirror_tls = match (
            &config.mirror.tls,
            &config.mirror.cert_file,
            &config.mirror.key_file,
        ) {
            (settings::MirrorTls::Files, Some(c), Some(k)) => {
                MirrorTls::Files(load_tls_files(c, k)?)
            }
            (settings::MirrorTls::Off, _, _) => MirrorTls::Off,
            _ => MirrorTls::Ca {
                hostname: config.mirror.hostname.clone(),
            },
        };
        // The mirror's own name is known now: its leaf is minted before the first client
        // waits for it in a handshake (other names are minted on first use).
        if let MirrorTls::Ca { hostname } = &mirror_tls {
            let serving = listeners.iter().any(|(k, _)| *k == Listener::Mirror);
            if serving && !hostname.is_empty() {
                if let Err(e) = ca.server_config(hostname).await {
                    tracing::warn!(error = %e, "cannot mint the mirror's certificate");
                }
            }
        }
        let ingress = Arc::new(Ingress {
            api,
            ca,
            catalog,
            own,
            limits: connection::Limits {
                header_timeout: config.proxy.header_timeout.0,
                idle_timeout: config.proxy.idle_timeout.0,
            },
            proxy: ProxySettings {
                other_hosts: config.proxy.other_hosts,
                tunnel_ports: config.proxy.tunnel_ports.clone(),
                allow: config.proxy.allow.clone(),
                users: config
                    .proxy
                    .users_file
                    .as_deref()
                    .map(ProxyUsers::load)
                    .transpose()?,
            },
            mirror: MirrorSettings {
                tls: mirror_tls,
                default_registry: Registry::from_reference_domain(&config.mirror.default_registry)
                    .expect("validated default_registry"),
                any_registry: config.mirror.any_registry,
                users: config.mirror_users()?,
                allow: config.mirror.allow.clone(),
            },
            direct: DirectSettings {
                upstream_port: config.direct.upstream_port.unwrap_or(443),
                allow: config.direct.allow.clone(),
            },
            connections: Arc::new(tokio::sync::Semaphore::new(config.proxy.max_connections)),
            workers: crate::ingress::workers::Workers::per_core().map_err(Error::Workers)?,
            tasks,
            shutdown: CancellationToken::new(),
            config: Arc::new(config.clone()),
        });
        Ok(Server {
            ingress,
            listeners,
            grace: config.proxy.shutdown_grace.0,
        })
    }

    fn addr(&self, kind: Listener) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, l)| l.local_addr().ok())
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.addr(Listener::Proxy)
            .expect("the proxy listener is bound")
    }

    pub fn mirror_addr(&self) -> Option<SocketAddr> {
        self.addr(Listener::Mirror)
    }

    pub fn direct_addr(&self) -> Option<SocketAddr> {
        self.addr(Listener::Direct)
    }

    pub fn ca_cert_pem(&self) -> String {
        self.ingress.ca.cert_pem().to_owned()
    }

    /// Serves one connection of listener `kind` over `io` as its accept loop would, once
    /// the client passed the allow list, the connection limit and the first-byte deadline
    /// (none of which apply here); `peer` is the client, `local` the address it reached.
    /// Runs until the connection ends. For in-process harnesses (`fuzz/`), without `run`.
    pub fn serve_connection<IO>(
        &self,
        kind: Listener,
        io: IO,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let ingress = self.ingress.clone();
        async move {
            match kind {
                Listener::Proxy => {
                    crate::ingress::forward_proxy::serve_connection(ingress, io, peer).await
                }
                Listener::Mirror => {
                    crate::ingress::mirror::serve_connection(ingress, io, peer, Some(local)).await
                }
                Listener::Direct => {
                    crate::ingress::direct::serve_connection(ingress, io, peer).await
                }
            }
        }
    }

    /// Background work still running (fills, probes, CONNECT tunnels, connections served
    /// by `run`): a harness waits for zero before it inspects the cache.
    pub fn tasks_in_flight(&self) -> usize {
        self.ingress.tasks.len()
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let Server {
            ingress,
            listeners,
            grace,
        } = self;
        let mut accept_loops = Vec::new();
        for (kind, listener) in listeners {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(listener = kind.as_str(), listen = %addr, "listening");
            }
            accept_loops.push(tokio::spawn(crate::ingress::accept::run(
                ingress.clone(),
                kind,
                listener,
            )));
        }
        let cache = ingress.api.cache.clone();
        let housekeeping = tokio::spawn(crate::cache::eviction::run(
            cache.clone(),
            ingress.api.metrics.clone(),
            ingress.shutdown.clone(),
        ));
        let warm = &ingress.config.prefetch;
        if !warm.images.is_empty() {
            ingress
                .tasks
                .spawn(crate::registry_api::prefetch::keep_warm(
                    ingress.api.clone(),
                    warm.image_refs(),
                    warm.platform_list(),
                    warm.interval.0,
                    ingress.shutdown.clone(),
                ));
        }
        shutdown.await;
        let tasks = &ingress.tasks;
        tracing::info!(in_flight = tasks.len(), grace = ?grace, "shutting down");
        ingress.shutdown.cancel();
        for l in accept_loops {
            let _ = l.await;
        }
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!(
                cut = tasks.len(),
                "shutdown grace over; closing remaining connections"
            );
        }
        ingress.workers.stop();
        let _ = housekeeping.await;
        let store = cache.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush_atimes()).await;
        Ok(())
    }
}

/// The process's open-file limits after [`raise_open_file_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit before (what the process was started with).
    pub was: u64,
    /// The soft limit now: what `accept`, upstream connections and cache files share.
    pub soft: u64,
    /// The hard limit (`None`: unlimited).
    pub hard: Option<u64>,
}

/// The soft limit to ask for: the hard limit. An unlimited hard limit leaves the soft one
/// alone, since Linux refuses a soft `RLIMIT_NOFILE` above `fs.nr_open` anyway.
fn nofile_target(soft: u64, hard: Option<u64>) -> u64 {
    hard.map_or(soft, |h| h.max(soft))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as production proxies do at
/// start-up: the soft default (often 1024) would make `accept` fail with EMFILE long
/// before `[proxy] max_connections`. Called once by `main`; process-wide.
pub fn raise_open_file_limit() -> std::io::Result<OpenFileLimit> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    let was = cur.current.unwrap_or(u64::MAX);
    let soft = nofile_target(was, cur.maximum);
    if soft != was {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(soft),
                maximum: cur.maximum,
            },
        )?;
    }
    let now = getrlimit(Resource::Nofile);
    Ok(OpenFileLimit {
        was,
        soft: now.current.unwrap_or(u64::MAX),
        hard: now.maximum,
    })
}

/// File descriptors a busy proxy connection holds: the client's, and an upstream
/// connection, tunnel or cache file.
const FDS_PER_CONNECTION: u64 = 2;

/// A warning when `max_connections` connections could run the process out of file
/// descriptors, so that EMFILE (refused accepts, failed upstream connects and cache
/// reads) does not come before the connection limit's clean 503.
pub fn open_file_warning(max_connections: usize, soft_limit: u64) -> Option<String> {
    let need = (max_connections as u64).saturating_mul(FDS_PER_CONNECTION) + 256;
    (need > soft_limit).then(|| {
        format!(
            "[proxy] max_connections = {max_connections} may need up to {need} file descriptors \
             but the open file limit is {soft_limit}: raise the hard limit (ulimit -Hn, \
             LimitNOFILE=) or lower max_connections"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_soft_limit_goes_to_the_hard_limit() {
        assert_eq!(nofile_target(1024, Some(524_288)), 524_288);
        assert_eq!(nofile_target(20_000, Some(20_000)), 20_000);
        // Never lowered, and an unlimited hard limit leaves it alone.
        assert_eq!(nofile_target(4096, Some(1024)), 4096);
        assert_eq!(nofile_target(1024, None), 1024);
    }

    #[test]
    fn raise_open_file_limit_leaves_soft_equal_to_hard() {
        let l = raise_open_file_limit().expect("setrlimit");
        assert!(l.soft >= l.was);
        if let Some(hard) = l.hard {
            assert_eq!(l.soft, hard);
        }
        let cur = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(cur.current, Some(l.soft));
    }

    #[test]
    fn max_connections_above_the_fd_budget_is_warned_about() {
        assert!(open_file_warning(4096, 1024).is_some());
        assert!(open_file_warning(4096, 1 << 20).is_none());
        let w = open_file_warning(12_000, 20_000).expect("2 fds a connection");
        assert!(w.contains("max_connections = 12000"), "{w}");
    }
}
