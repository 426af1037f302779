//! The running server: shared state, listeners, and shutdown.
//!
//! `Server::bind` does everything that can fail at start-up (config checks, CA, cache,
//! upstream TLS roots, binding) so that `run` only serves. `run` stops accepting when its
//! shutdown future resolves, asks every connection to finish, and waits for in-flight work
//! (including fills) up to `[proxy] shutdown_grace`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::access::Access;
use crate::auth::{Answer, Tokens};
use crate::ca::{CaError, CertificateAuthority};
use crate::config::{AuthCheck, Config, ConfigError, Credentials, OtherHosts};
use crate::fill::Fills;
use crate::store::{BlobStore, StoreError};
use crate::upstream::Upstream;

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
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// What a host in a `CONNECT` is to Stowage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    Registry,
    AuthHost,
}

/// Everything a connection needs, shared by all of them.
pub struct State {
    pub ca: CertificateAuthority,
    pub store: Arc<BlobStore>,
    pub fills: Arc<Fills>,
    pub upstream: Upstream,
    pub hosts: HashMap<String, HostKind>,
    /// Registry host → configured account.
    pub credentials: HashMap<String, Credentials>,
    /// Auth host → account added to clients' anonymous token requests.
    pub inject: HashMap<String, Credentials>,
    pub tokens: Tokens,
    pub access: Access,
    pub config: Arc<Config>,
    pub other_hosts: OtherHosts,
    pub max_manifest_size: u64,
    pub idle_timeout: Duration,
    pub header_timeout: Duration,
    /// Connections and fills; waited for on shutdown.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    pub proxy_addr: SocketAddr,
}

impl State {
    pub fn host_kind(&self, host: &str) -> Option<HostKind> {
        self.hosts.get(host).copied()
    }

    /// How Stowage answers upstream challenges for clients without credentials of their
    /// own, in forward-proxy mode: with the registry's configured account, if any.
    pub fn proxy_answer(&self, registry: &str) -> Answer<'_> {
        match self.credentials.get(registry) {
            Some(c) => Answer::With(Some(c)),
            None => Answer::No,
        }
    }

    pub fn auth_check(&self) -> AuthCheck {
        self.config.cache.auth_check
    }

    pub fn offline(&self) -> bool {
        self.config.cache.offline
    }
}

pub struct Server {
    state: Arc<State>,
    listener: TcpListener,
    grace: Duration,
}

impl Server {
    pub async fn bind(config: Config) -> Result<Server, Error> {
        config.validate()?;
        let addr = config.proxy_listen()?;
        let ca = CertificateAuthority::load_or_create(&config.ca.dir)?;
        let store = {
            let dir = config.cache.dir.clone();
            tokio::task::spawn_blocking(move || BlobStore::open(&dir)).await.expect("store open task")?
        };
        let upstream = Upstream::new(&config.upstream).map_err(Error::Upstream)?;
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        let proxy_addr = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
        let mut hosts = HashMap::new();
        let mut credentials = HashMap::new();
        let mut inject = HashMap::new();
        let registries = config.registries();
        for (i, r) in registries.iter().enumerate() {
            for a in &r.auth_hosts {
                hosts.insert(a.clone(), HostKind::AuthHost);
            }
            let index = config.registry.iter().position(|c| c.host == r.host).unwrap_or(i);
            if let Some(c) = r.credentials(index)? {
                tracing::info!(registry = %r.host, username = %c.username, "using configured upstream credentials");
                if r.inject() {
                    for a in &r.auth_hosts {
                        inject.insert(a.clone(), c.clone());
                    }
                }
                credentials.insert(r.host.clone(), c);
            }
        }
        for r in &registries {
            hosts.insert(r.host.clone(), HostKind::Registry);
        }
        if config.cache.auth_check == AuthCheck::None {
            tracing::warn!("cache.auth_check = \"none\": every cached object is served to anyone who reaches the proxy");
        }
        let state = Arc::new(State {
            ca,
            store,
            fills: Arc::new(Fills::default()),
            upstream,
            hosts,
            credentials,
            inject,
            tokens: Tokens::default(),
            access: Access::new(config.cache.auth_ttl.0, config.cache.public_ttl.0),
            other_hosts: config.proxy.other_hosts,
            max_manifest_size: config.cache.max_manifest_size.0,
            idle_timeout: config.proxy.idle_timeout.0,
            header_timeout: config.proxy.header_timeout.0,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            proxy_addr,
            config: Arc::new(config.clone()),
        });
        Ok(Server { state, listener, grace: config.proxy.shutdown_grace.0 })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.state.proxy_addr
    }

    pub fn ca_cert_pem(&self) -> String {
        self.state.ca.cert_pem().to_owned()
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        let Server { state, listener, grace } = self;
        tracing::info!(listen = %state.proxy_addr, "stowage proxy listening");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let span = tracing::info_span!("conn", %peer);
                        state.tasks.spawn(crate::proxy::serve_connection(state.clone(), stream, peer).instrument(span));
                    }
                    Err(e) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        tracing::info!(in_flight = state.tasks.len(), grace = ?grace, "shutting down");
        state.shutdown.cancel();
        state.tasks.close();
        if tokio::time::timeout(grace, state.tasks.wait()).await.is_err() {
            tracing::warn!(cut = state.tasks.len(), "shutdown grace over; closing remaining connections");
        }
        Ok(())
    }
}
