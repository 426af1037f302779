//! The Stowage server under test, configured through its TOML like a user would: proxy on
//! 127.0.0.1:0, CA and cache in a tempdir, the test CA trusted upstream, every fake host
//! pinned to 127.0.0.1. Stopped (oneshot shutdown) when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::sync::oneshot;

use super::client::ProxyClient;
use super::tls::{install_provider, TestCa};
use super::FAKE_HOSTS;

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn toml_path(p: &Path) -> String {
    toml_str(p.to_str().expect("utf-8 temp path"))
}

pub struct StowageBuilder {
    other_hosts: &'static str,
    extra_ca: Vec<PathBuf>,
    proxy_toml: String,
    extra_toml: String,
    cache_toml: String,
    upstream_toml: String,
    listen: Option<String>,
    cache_dir: Option<PathBuf>,
    pins: Vec<(String, String)>,
}

impl StowageBuilder {
    /// Trust `ca` for upstream TLS (`[upstream] extra_ca`).
    pub fn trust(mut self, ca: &TestCa) -> Self {
        self.extra_ca.push(ca.pem_path().to_owned());
        self
    }

    /// `"tunnel"` (default) or `"deny"`.
    pub fn other_hosts(mut self, v: &'static str) -> Self {
        self.other_hosts = v;
        self
    }

    /// `[proxy] tunnel_ports`: ports blind tunnels may reach (Stowage's default is 443 only).
    pub fn tunnel_ports(mut self, ports: &[u16]) -> Self {
        let list: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        self.proxy_toml
            .push_str(&format!("tunnel_ports = [{}]\n", list.join(", ")));
        self
    }

    /// A `key = value` line for the generated `[cache]` table (which `toml` cannot repeat),
    /// e.g. `manifest_ttl = "1s"` or `offline = true`.
    pub fn cache(mut self, line: &str) -> Self {
        self.cache_toml.push_str(line);
        self.cache_toml.push('\n');
        self
    }

    /// A `key = value` line for the generated `[proxy]` table, e.g. `allow = ["10.0.0.0/8"]`.
    pub fn proxy(mut self, line: &str) -> Self {
        self.proxy_toml.push_str(line);
        self.proxy_toml.push('\n');
        self
    }

    /// A `key = value` line for the generated `[upstream]` table, e.g. `idle_timeout = "1s"`.
    pub fn upstream(mut self, line: &str) -> Self {
        self.upstream_toml.push_str(line);
        self.upstream_toml.push('\n');
        self
    }

    /// An `[upstream.resolve]` pin besides the fakes' (`host` to `ip`, which may be any
    /// address: `::ffff:127.0.0.1`, `0.0.0.0`).
    pub fn pin(mut self, host: &str, ip: &str) -> Self {
        self.pins.push((host.to_owned(), ip.to_owned()));
        self
    }

    /// `[proxy] listen` instead of `127.0.0.1:0`.
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = Some(addr.to_owned());
        self
    }

    /// `[cache] dir`: this directory (owned by the test, e.g. a `tempfile::TempDir` it
    /// keeps) instead of one inside the instance's own tempdir, so a second instance
    /// started on the same path after [`Stowage::stop`] opens the same cache (a restart).
    pub fn cache_dir(mut self, dir: &Path) -> Self {
        self.cache_dir = Some(dir.to_owned());
        self
    }

    /// Appended to the generated TOML; must start with a table header.
    pub fn toml(mut self, extra: &str) -> Self {
        self.extra_toml.push('\n');
        self.extra_toml.push_str(extra);
        self
    }

    pub async fn start(self) -> Stowage {
        super::init_tracing();
        install_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("certs");
        let cache_dir = self
            .cache_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("cache"));
        let extra_ca: Vec<String> = self.extra_ca.iter().map(|p| toml_path(p)).collect();
        let mut toml = format!(
            "[proxy]\nlisten = {}\nother_hosts = {}\n{}\n[ca]\ndir = {}\n\n[cache]\ndir = {}\n{}\n[upstream]\nextra_ca = [{}]\nconnect_timeout = \"2s\"\n{}\n[upstream.resolve]\n",
            toml_str(self.listen.as_deref().unwrap_or("127.0.0.1:0")),
            toml_str(self.other_hosts),
            self.proxy_toml,
            toml_path(&ca_dir),
            toml_path(&cache_dir),
            self.cache_toml,
            extra_ca.join(", "),
            self.upstream_toml,
        );
        for h in FAKE_HOSTS {
            toml.push_str(&format!("{} = \"127.0.0.1\"\n", toml_str(h)));
        }
        for (host, ip) in &self.pins {
            toml.push_str(&format!("{} = {}\n", toml_str(host), toml_str(ip)));
        }
        toml.push_str("\n[[registry]]\nhost = \"registry.example.test\"\nauth_hosts = [\"auth.example.test\"]\n");
        toml.push_str(&self.extra_toml);
        let config = stowage::Config::from_toml_str(&toml)
            .unwrap_or_else(|e| panic!("config rejected: {e}\n{toml}"));
        let server = stowage::Server::bind(config)
            .await
            .unwrap_or_else(|e| panic!("Server::bind: {e}"));
        let addr = server.proxy_addr();
        let (mirror_addr, direct_addr) = (server.mirror_addr(), server.direct_addr());
        let ca_pem = server.ca_cert_pem();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Stowage {
            addr,
            mirror_addr,
            direct_addr,
            ca_pem,
            toml,
            cache_dir,
            ca_dir,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }
}

pub struct Stowage {
    pub addr: SocketAddr,
    /// The `[mirror]` listener, when configured.
    pub mirror_addr: Option<SocketAddr>,
    /// The `[direct]` (SNI) listener, when configured.
    pub direct_addr: Option<SocketAddr>,
    pub ca_pem: String,
    /// The configuration it was started with.
    pub toml: String,
    pub cache_dir: PathBuf,
    pub ca_dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), stowage::Error>>>,
    _dir: tempfile::TempDir,
}

impl Stowage {
    pub fn builder() -> StowageBuilder {
        StowageBuilder {
            other_hosts: "tunnel",
            extra_ca: Vec::new(),
            proxy_toml: String::new(),
            extra_toml: String::new(),
            cache_toml: String::new(),
            upstream_toml: String::new(),
            listen: None,
            cache_dir: None,
            pins: Vec::new(),
        }
    }

    /// Started with defaults, trusting `ca` upstream.
    pub async fn start(ca: &TestCa) -> Stowage {
        Stowage::builder().trust(ca).start().await
    }

    /// A client through this proxy trusting only Stowage's CA.
    pub fn client(&self) -> ProxyClient {
        ProxyClient::via_proxy(self.addr, &self.ca_pem)
    }

    /// Where verified content for `digest` (`sha256:<hex>`) must live.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.cache_dir
            .join("blobs")
            .join("sha256")
            .join(&hex[..2])
            .join(hex)
    }

    pub fn is_cached(&self, digest: &str) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Every file under `<cache>/blobs`.
    pub fn cached_files(&self) -> Vec<PathBuf> {
        super::util::files_under(&self.cache_dir.join("blobs"))
    }

    /// Every file under `<cache>/tmp` (fills in progress or leftovers).
    pub fn temp_files(&self) -> Vec<PathBuf> {
        super::util::files_under(&self.cache_dir.join("tmp"))
    }

    /// Stops the server and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), stowage::Error> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("running");
        tokio::time::timeout(std::time::Duration::from_secs(15), task)
            .await
            .expect("run() returned after shutdown")
            .expect("run task")
    }
}

impl Drop for Stowage {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
