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
use crate::ingress::ca::{CaError, CertificateAuthority};
use crate::ingress::client_auth::ProxyUsers;
use crate::ingress::loop_guard::OwnAddresses;
use crate::ingress::{
    connection, DirectSettings, HostKind, Ingress, Listener, MirrorSettings, MirrorTls,
    ProxySettings,
};
use crate::oci::Registry;
use crate::registry_api::{Accounts, RegistryApi};
use crate::settings::{self, AuthCheck, BackendKind, Config, ConfigError};
use crate::telemetry::Metrics;
use crate::upstream::{Transport, Upstream};

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
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Server {
    ingress: Arc<Ingress>,
    listeners: Vec<(Listener, TcpListener)>,
    grace: Duration,
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
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
        }
        let index = config
            .registry
            .iter()
            .position(|c| c.registry() == r.registry())
            .unwrap_or(i);
        if let Some(c) = r.credentials(index)? {
            tracing::info!(registry = %r.registry(), username = %c.username, "using configured upstream credentials");
            if r.inject() {
                for a in r.auth_origins() {
                    accounts.inject.insert(a, c.clone());
                }
            }
            accounts.credentials.insert(r.registry(), c);
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
        let ca = CertificateAuthority::load_or_create(&config.ca.dir)?;
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
        let api = Arc::new(RegistryApi::new(
            cache,
            upstream,
            access,
            metrics,
            accounts,
            config.tag_ttls(),
            tasks.clone(),
        ));

        let mut listeners = Vec::new();
        let mut own = OwnAddresses::default();
        let (l, local) = bind(proxy_listen).await?;
        listeners.push((Listener::Proxy, l));
        own.listeners.push(local);
        if let Some(a) = config.mirror_listen()? {
            let (l, local) = bind(a).await?;
            listeners.push((Listener::Mirror, l));
            own.listeners.push(local);
        }
        if let Some(a) = config.direct_listen()? {
            let (l, local) = bind(a).await?;
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
        let _ = housekeeping.await;
        let store = cache.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush_atimes()).await;
        Ok(())
    }
}
