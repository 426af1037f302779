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
use crate::oci::{Host, Registry, RepoKey, TagKey};
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
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

const WRITE_ERROR_PAUSE: Duration = Duration::from_secs(30);
/// Evict down to this fraction of `max_size`.
const LOW_WATERMARK: f64 = 0.9;
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(30);

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
    pub upstream: Arc<Upstream>,
    /// The shared tier behind the local cache, if configured.
    pub backend: Option<Arc<dyn crate::backend::Backend>>,
    /// Hosts whose TLS is terminated (port-independent: what is cached and who may read it
    /// is keyed by the full `Registry` elsewhere).
    pub hosts: HashMap<Host, HostKind>,
    /// Registry (scheme, host and port) → configured account.
    pub credentials: HashMap<Registry, Credentials>,
    /// Auth host origin → account added to clients' anonymous token requests.
    pub inject: HashMap<Registry, Credentials>,
    pub tokens: Tokens,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub access: Access,
    /// (repository, manifest digest) → tag rows waiting for that manifest to be stored
    /// (tags resolved with `HEAD`; see `registry::remember_tag_head`).
    pub pending_tags:
        moka::sync::Cache<(RepoKey, crate::oci::Digest), Vec<(TagKey, crate::store::TagVariant)>>,
    pub config: Arc<Config>,
    pub other_hosts: OtherHosts,
    pub max_manifest_size: u64,
    pub max_size: u64,
    /// After a cache write error, new fills are paused until this time (unix ms), so a
    /// full or failing disk does not cause a storm of failing writes.
    pub cache_paused_until: std::sync::atomic::AtomicU64,
    pub idle_timeout: Duration,
    pub header_timeout: Duration,
    /// Connections and fills; waited for on shutdown.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    pub proxy_addr: SocketAddr,
    pub mirror_addr: Option<SocketAddr>,
    pub direct_addr: Option<SocketAddr>,
    /// Accounts the mirror listener accepts (empty: open).
    pub mirror_users: Vec<Credentials>,
    /// The mirror's TLS config from `cert_file`/`key_file`, when `tls = "files"`.
    pub mirror_tls: Option<Arc<rustls::ServerConfig>>,
    /// Proxy users, when `[proxy] users_file` is set.
    pub proxy_users: Option<Arc<crate::guard::ProxyUsers>>,
    /// Bounds client connections across listeners.
    pub connections: Arc<tokio::sync::Semaphore>,
}

impl State {
    pub fn host_kind(&self, host: &Host) -> Option<HostKind> {
        self.hosts.get(host).copied()
    }

    /// How Stowage answers upstream challenges for clients without credentials of their
    /// own: with the registry's configured account if any; else anonymously for mirror
    /// clients (who cannot log in upstream), and not at all for proxy clients (they do
    /// their own token dance).
    pub fn answer(&self, target: &crate::registry::Target) -> Answer<'_> {
        match self.credentials.get(&target.registry) {
            Some(c) => Answer::With(Some(c)),
            None if target.mirror => Answer::With(None),
            None => Answer::No,
        }
    }

    /// Whether `addr` is one of Stowage's own listeners (a request loop if used upstream).
    pub fn is_own_address(&self, addr: &SocketAddr) -> bool {
        [Some(self.proxy_addr), self.mirror_addr, self.direct_addr]
            .into_iter()
            .flatten()
            .any(|own| {
                own.port() == addr.port()
                    && (own.ip() == addr.ip()
                        || (own.ip().is_unspecified() && addr.ip().is_loopback()))
            })
    }

    /// The metrics text, with live gauges read now.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        m.fills_in_flight.set(self.fills.in_flight() as i64);
        m.cache_size.set(self.store.index.total() as i64);
        m.cache_objects.set(self.store.index.len() as i64);
        let minted = self.ca.minted();
        let counted = m.certificates_minted.get();
        if minted > counted {
            m.certificates_minted.inc_by(minted - counted);
        }
        m.render()
    }

    /// Whether a new object may be written to the cache now; `Err` names why not.
    pub fn may_cache(&self) -> Result<(), &'static str> {
        use std::sync::atomic::Ordering;
        if crate::access::now_ms() < self.cache_paused_until.load(Ordering::Relaxed) {
            return Err("paused after a write error");
        }
        match self.store.free_space() {
            Some(free) if free < self.config.cache.min_free.0 => Err("disk_full"),
            _ => Ok(()),
        }
    }

    /// Pauses new fills for a while after a write error.
    pub fn pause_caching(&self) {
        let until = crate::access::now_ms() + WRITE_ERROR_PAUSE.as_millis() as u64;
        self.cache_paused_until
            .store(until, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn auth_check(&self) -> AuthCheck {
        self.config.cache.auth_check
    }

    pub fn offline(&self) -> bool {
        self.config.cache.offline
    }
}

#[derive(Clone, Copy, Debug)]
enum Listener {
    Proxy,
    Mirror,
    Direct,
}

pub struct Server {
    state: Arc<State>,
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
    let config = crate::ca::server_tls_config(chain, key).map_err(|e| bad(e.to_string()))?;
    Ok(Arc::new(config))
}

impl Server {
    pub async fn bind(config: Config) -> Result<Server, Error> {
        // aws-lc seeds its random generator from CPU jitter on first use: ~100 ms that the
        // first client's TLS handshake (and leaf key) would otherwise wait for. Done before
        // any listener exists, so no client can arrive during it.
        let mut seed = [0u8; 16];
        let _ = aws_lc_rs::rand::fill(&mut seed);
        config.validate()?;
        let addr = config.proxy_listen()?;
        let ca = CertificateAuthority::load_or_create(&config.ca.dir)?;
        let store = {
            let dir = config.cache.dir.clone();
            tokio::task::spawn_blocking(move || BlobStore::open(&dir))
                .await
                .expect("store open task")?
        };
        store.set_max_size(config.cache.max_size.0);
        tracing::info!(
            objects = store.index.len(),
            bytes = store.index.total(),
            "cache opened"
        );
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let upstream = Arc::new(
            Upstream::new(&config.upstream, Some(metrics.clone())).map_err(Error::Upstream)?,
        );
        let backend: Option<Arc<dyn crate::backend::Backend>> = match config.storage.backend {
            crate::config::BackendKind::Local => None,
            crate::config::BackendKind::Dir => Some(Arc::new(crate::backend::FsBackend::new(
                config.storage.dir.clone().expect("validated"),
            ))),
            crate::config::BackendKind::S3 => Some(Arc::new(
                crate::backend::S3Backend::new(&config.storage, upstream.clone())
                    .map_err(Error::Upstream)?,
            )),
        };
        if let Some(b) = &backend {
            tracing::info!(store = %b.describe(), "shared blob tier enabled");
        }
        let mut listeners = Vec::new();
        let (l, proxy_addr) = bind(addr).await?;
        listeners.push((Listener::Proxy, l));
        let mut mirror_addr = None;
        if let Some(a) = config.mirror_listen()? {
            let (l, local) = bind(a).await?;
            listeners.push((Listener::Mirror, l));
            mirror_addr = Some(local);
        }
        let mut direct_addr = None;
        if let Some(a) = config.direct_listen()? {
            let (l, local) = bind(a).await?;
            listeners.push((Listener::Direct, l));
            direct_addr = Some(local);
        }
        let mirror_users = config.mirror_users()?;
        let proxy_users = config
            .proxy
            .users_file
            .as_deref()
            .map(crate::guard::ProxyUsers::load)
            .transpose()?;
        let mirror_tls = match (
            &config.mirror.tls,
            &config.mirror.cert_file,
            &config.mirror.key_file,
        ) {
            (crate::config::MirrorTls::Files, Some(c), Some(k)) => Some(load_tls_files(c, k)?),
            _ => None,
        };
        let mut hosts = HashMap::new();
        let mut credentials = HashMap::new();
        let mut inject = HashMap::new();
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
                        inject.insert(a, c.clone());
                    }
                }
                credentials.insert(r.registry(), c);
            }
        }
        for r in &registries {
            hosts.insert(r.registry().host().clone(), HostKind::Registry);
        }
        if config.cache.auth_check == AuthCheck::None {
            tracing::warn!("cache.auth_check = \"none\": every cached object is served to anyone who reaches the proxy");
        }
        let state = Arc::new(State {
            ca,
            store: store.clone(),
            fills: Arc::new(Fills::default()),
            upstream,
            backend,
            hosts,
            credentials,
            inject,
            tokens: Tokens::default(),
            metrics,
            access: Access::new(
                store.clone(),
                config.cache.auth_check,
                config.cache.offline,
                config.cache.auth_ttl.0,
                config.cache.public_ttl.0,
            ),
            pending_tags: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(crate::registry::PENDING_TAG_TTL)
                .build(),
            other_hosts: config.proxy.other_hosts,
            max_manifest_size: config.cache.max_manifest_size.0,
            max_size: config.cache.max_size.0,
            cache_paused_until: std::sync::atomic::AtomicU64::new(0),
            idle_timeout: config.proxy.idle_timeout.0,
            header_timeout: config.proxy.header_timeout.0,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            proxy_addr,
            mirror_addr,
            direct_addr,
            mirror_users,
            mirror_tls,
            proxy_users,
            connections: Arc::new(tokio::sync::Semaphore::new(config.proxy.max_connections)),
            config: Arc::new(config.clone()),
        });
        Ok(Server {
            state,
            listeners,
            grace: config.proxy.shutdown_grace.0,
        })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.state.proxy_addr
    }

    pub fn mirror_addr(&self) -> Option<SocketAddr> {
        self.state.mirror_addr
    }

    pub fn direct_addr(&self) -> Option<SocketAddr> {
        self.state.direct_addr
    }

    pub fn ca_cert_pem(&self) -> String {
        self.state.ca.cert_pem().to_owned()
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let Server {
            state,
            listeners,
            grace,
        } = self;
        let mut accept_loops = Vec::new();
        for (kind, listener) in listeners {
            let addr = listener.local_addr().ok();
            tracing::info!(listener = ?kind, listen = ?addr, "listening");
            accept_loops.push(tokio::spawn(accept_loop(state.clone(), kind, listener)));
        }
        let housekeeping = tokio::spawn(housekeeping(state.clone()));
        shutdown.await;
        tracing::info!(in_flight = state.tasks.len(), grace = ?grace, "shutting down");
        state.shutdown.cancel();
        for l in accept_loops {
            let _ = l.await;
        }
        state.tasks.close();
        if tokio::time::timeout(grace, state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                cut = state.tasks.len(),
                "shutdown grace over; closing remaining connections"
            );
        }
        let _ = housekeeping.await;
        let store = state.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush_atimes()).await;
        Ok(())
    }
}

/// Keeps the cache under `max_size` and persists access times, until shutdown.
async fn housekeeping(state: Arc<State>) {
    loop {
        tokio::select! {
            () = state.store.pressure.notified() => {}
            () = tokio::time::sleep(HOUSEKEEPING_INTERVAL) => {}
            () = state.shutdown.cancelled() => return,
        }
        let st = state.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut evicted = (0, 0);
            if st.store.index.total() > st.max_size {
                let target = (st.max_size as f64 * LOW_WATERMARK) as u64;
                evicted = st.store.evict(target, None)?;
            }
            st.store.flush_atimes()?;
            Ok::<_, StoreError>(evicted)
        })
        .await;
        match result {
            Ok(Ok((0, _))) => {}
            Ok(Ok((n, bytes))) => {
                state.metrics.evictions.inc_by(n);
                state.metrics.evicted_bytes.inc_by(bytes);
                tracing::info!(
                    objects = n,
                    bytes,
                    size = state.store.index.total(),
                    "evicted least recently used objects"
                );
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cache housekeeping failed"),
            Err(e) => tracing::warn!(error = %e, "cache housekeeping task failed"),
        }
    }
}

/// Answers a refused HTTP client with a short response and closes.
async fn refuse(mut stream: tokio::net::TcpStream, status: &str, message: &str) {
    use tokio::io::AsyncWriteExt;
    let body = format!("{message}\n");
    let resp = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Accepts connections on one listener until shutdown, each served in its own task.
async fn accept_loop(state: Arc<State>, kind: Listener, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = state.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let allow = match kind {
                    Listener::Proxy => &state.config.proxy.allow,
                    Listener::Mirror => &state.config.mirror.allow,
                    Listener::Direct => &state.config.direct.allow,
                };
                if !crate::guard::allowed(allow, peer.ip()) {
                    tracing::info!(%peer, listener = ?kind, "client not in the allow list: refused");
                    if !matches!(kind, Listener::Direct) {
                        state.tasks.spawn(refuse(
                            stream,
                            "403 Forbidden",
                            "your address may not use this proxy",
                        ));
                    }
                    continue;
                }
                let Ok(permit) = state.connections.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached: refused");
                    if !matches!(kind, Listener::Direct) {
                        state.tasks.spawn(refuse(
                            stream,
                            "503 Service Unavailable",
                            "too many connections",
                        ));
                    } else {
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
                    }
                    continue;
                };
                let st = state.clone();
                let conn = async move {
                    match kind {
                        Listener::Proxy => {
                            crate::proxy::serve_connection(st, stream, peer)
                                .instrument(tracing::info_span!("conn", %peer))
                                .await
                        }
                        Listener::Mirror => {
                            crate::mirror::serve_mirror_connection(st, stream, peer)
                                .instrument(tracing::info_span!("mirror", %peer))
                                .await
                        }
                        Listener::Direct => {
                            crate::mirror::serve_direct_connection(st, stream, peer)
                                .instrument(tracing::info_span!("direct", %peer))
                                .await
                        }
                    }
                    drop(permit);
                };
                state.tasks.spawn(conn);
            }
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
