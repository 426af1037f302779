//! Configuration: TOML in, a validated `Config` out.
//!
//! Every section has a documented `Default`, unknown keys are errors that name the key,
//! sizes read like `50GiB` and durations like `10m`. `from_toml_str` parses and validates;
//! `load` adds the file. Nothing else in the crate reads configuration text.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::oci::{Host, Registry, Scheme};

/// The configuration shipped in the repository's `config.toml`, embedded so the binary
/// documents itself (`stowage config`).
pub const DEFAULT_TOML: &str = include_str!("../../config.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
    /// Any of the above, found in this file.
    #[error("{path}: {error}")]
    InFile {
        path: PathBuf,
        error: Box<ConfigError>,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub ca: CaConfig,
    pub cache: CacheConfig,
    pub upstream: UpstreamConfig,
    /// Registries whose TLS is terminated, in addition to the built-in list.
    pub registry: Vec<RegistryConfig>,
    pub log: LogConfig,
    pub mirror: MirrorConfig,
    pub direct: DirectConfig,
    pub storage: StorageConfig,
    pub prefetch: PrefetchConfig,
}

/// `[prefetch]`: images the server keeps warm itself, and the platforms a prefetch takes
/// from an index when it is not told which.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefetchConfig {
    /// Image references (`alpine:3`, `quay.io/org/app:1.2`) fetched at start-up and again
    /// every `interval`. Default: none.
    pub images: Vec<String>,
    /// How often the images are resolved again (what changed is fetched). Default `6h`.
    pub interval: HumanDuration,
    /// Platforms taken from an index (`os/arch[/variant]`), for these images and for
    /// `stowage prefetch` without `--platform`. Default `linux/amd64`, `linux/arm64`.
    pub platforms: Vec<String>,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            images: Vec::new(),
            interval: HumanDuration(Duration::from_secs(6 * 3600)),
            platforms: vec!["linux/amd64".into(), "linux/arm64".into()],
        }
    }
}

impl PrefetchConfig {
    /// The images, parsed (validated).
    pub fn image_refs(&self) -> Vec<crate::oci::ImageRef> {
        self.images
            .iter()
            .map(|i| i.parse().expect("validated prefetch.images"))
            .collect()
    }

    /// The platforms, parsed (validated).
    pub fn platform_list(&self) -> Vec<crate::oci::Platform> {
        self.platforms
            .iter()
            .map(|p| p.parse().expect("validated prefetch.platforms"))
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (i, image) in self.images.iter().enumerate() {
            if let Err(e) = image.parse::<crate::oci::ImageRef>() {
                return Err(invalid(format!("prefetch.images[{i}]"), e.to_string()));
            }
        }
        if self.platforms.is_empty() {
            return Err(invalid(
                "prefetch.platforms",
                "name at least one platform, e.g. [\"linux/amd64\"]",
            ));
        }
        for (i, p) in self.platforms.iter().enumerate() {
            if let Err(e) = p.parse::<crate::oci::Platform>() {
                return Err(invalid(format!("prefetch.platforms[{i}]"), e.to_string()));
            }
        }
        if self.interval.0.is_zero() {
            return Err(invalid("prefetch.interval", "must be greater than zero"));
        }
        Ok(())
    }
}

/// The shared tier behind the local cache, for replicas that share what they fetch.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `local` (only the local cache), `s3` (an S3-compatible bucket) or `dir` (a shared
    /// directory such as an NFS mount).
    pub backend: BackendKind,
    /// For `dir`.
    pub dir: Option<PathBuf>,
    pub bucket: String,
    /// Key prefix inside the bucket, e.g. `stowage/`.
    pub prefix: String,
    /// S3 API endpoint, e.g. `http://minio:9000`; default AWS S3 for `region`.
    pub endpoint: Option<String>,
    pub region: String,
    /// Path-style URLs (`endpoint/bucket/key`); default true when `endpoint` is set.
    pub path_style: Option<bool>,
    /// Environment variables holding the keys.
    pub access_key_env: String,
    pub secret_key_env: String,
    /// Or a TOML file with `access_key_id` and `secret_access_key`.
    pub credentials_file: Option<PathBuf>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: BackendKind::Local,
            dir: None,
            bucket: String::new(),
            prefix: String::new(),
            endpoint: None,
            region: "us-east-1".into(),
            path_style: None,
            access_key_env: "AWS_ACCESS_KEY_ID".into(),
            secret_key_env: "AWS_SECRET_ACCESS_KEY".into(),
            credentials_file: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Local,
    S3,
    Dir,
}

impl StorageConfig {
    /// The S3 access key and secret, read now.
    pub fn s3_credentials(&self) -> Result<(String, String), String> {
        if let Some(path) = &self.credentials_file {
            #[derive(Deserialize)]
            struct File {
                access_key_id: String,
                secret_access_key: String,
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("storage.credentials_file {}: {e}", path.display()))?;
            let f: File = toml::from_str(&text)
                .map_err(|e| format!("storage.credentials_file {}: {e}", path.display()))?;
            return Ok((f.access_key_id, f.secret_access_key));
        }
        let get = |var: &str| {
            std::env::var(var)
                .map_err(|_| format!("storage: environment variable {var} is not set"))
        };
        Ok((get(&self.access_key_env)?, get(&self.secret_key_env)?))
    }
}

/// The registry-mirror listener (`dockerd --registry-mirror`, containerd `hosts.toml`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorConfig {
    /// Address to listen on; empty (the default) turns the mirror off.
    pub listen: String,
    /// `off` (plain HTTP), `ca` (a leaf minted from Stowage's CA) or `files` (`cert_file`/`key_file`).
    pub tls: MirrorTls,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Name in the minted certificate when clients send no SNI (they connect by IP).
    pub hostname: String,
    /// Registry for requests without `?ns=` and without a registry path prefix.
    pub default_registry: String,
    /// Accept any `ns=`/prefix host, not only known registries. Default false.
    pub any_registry: bool,
    /// If set, clients must authenticate with one of these accounts (HTTP Basic).
    pub user: Vec<UserConfig>,
    /// Client networks allowed; empty allows everyone.
    pub allow: Vec<ipnet::IpNet>,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            listen: String::new(),
            tls: MirrorTls::Off,
            cert_file: None,
            key_file: None,
            hostname: "stowage.local".into(),
            default_registry: "registry-1.docker.io".into(),
            any_registry: false,
            user: Vec::new(),
            allow: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorTls {
    Off,
    Ca,
    Files,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// TLS for hosts redirected to Stowage by `/etc/hosts` or DNS: SNI picks the registry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectConfig {
    /// Address to listen on, usually `0.0.0.0:443`; empty (the default) turns it off.
    pub listen: String,
    /// Port of the real registries upstream. Default 443.
    pub upstream_port: Option<u16>,
    /// Client networks allowed; empty allows everyone.
    pub allow: Vec<ipnet::IpNet>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address of the forward-proxy listener (`HTTPS_PROXY`). Default `127.0.0.1:3128`.
    pub listen: String,
    /// What to do with `CONNECT` to hosts that are not registries.
    pub other_hosts: OtherHosts,
    /// A client connection idle this long (no request, or a stalled read) is closed. Default `2m`.
    pub idle_timeout: HumanDuration,
    /// Time a client has to send a request's headers or finish a TLS handshake. Default `30s`.
    pub header_timeout: HumanDuration,
    /// On shutdown, how long in-flight requests may take before they are cut. Default `10s`.
    pub shutdown_grace: HumanDuration,
    /// Client networks allowed to use this listener; empty allows everyone.
    pub allow: Vec<ipnet::IpNet>,
    /// htpasswd-style file (`user:<bcrypt hash>` lines, `htpasswd -B`): when set, clients
    /// must send `Proxy-Authorization: Basic` to CONNECT or proxy.
    pub users_file: Option<PathBuf>,
    /// Ports that blind tunnels (non-registry hosts) may reach. Registries themselves are
    /// reachable on any port, since only the registry API is spoken to them.
    pub tunnel_ports: Vec<u16>,
    /// Most client connections at once (all listeners); more are closed at accept. Each
    /// may hold two file descriptors (see `server::open_file_warning`).
    pub max_connections: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:3128".into(),
            other_hosts: OtherHosts::Tunnel,
            idle_timeout: HumanDuration(Duration::from_secs(120)),
            header_timeout: HumanDuration(Duration::from_secs(30)),
            shutdown_grace: HumanDuration(Duration::from_secs(10)),
            allow: Vec::new(),
            users_file: None,
            tunnel_ports: vec![443],
            max_connections: 4096,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtherHosts {
    /// Blind TCP tunnel, bytes untouched.
    Tunnel,
    /// `403 Forbidden`.
    Deny,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaConfig {
    /// Directory holding `ca.crt` and `ca.key`; both are created on first start. Default `certs`.
    pub dir: PathBuf,
    /// Make the CA with X.509 name constraints: it can then sign only for the configured
    /// registries, their auth hosts and the mirror's names (and IP literals among them), so
    /// a stolen `ca.key` impersonates nothing else. A registry added later needs a new CA.
    /// Default false.
    pub name_constraints: bool,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            dir: "certs".into(),
            name_constraints: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Cache directory. Default `cache`.
    pub dir: PathBuf,
    /// Largest manifest that is cached; larger ones are passed through. Default `4MiB`.
    pub max_manifest_size: Size,
    /// Size bound of the cache; above it, least recently used objects are evicted in the
    /// background down to 90%. Default `50GiB`.
    pub max_size: Size,
    /// Below this much free disk space nothing new is cached (requests are served from
    /// upstream). Default `1GiB`.
    pub min_free: Size,
    /// Most blob downloads into the cache at once; beyond it requests pass through. Default 64.
    pub max_concurrent_fills: usize,
    /// How long a manifest fetched by tag is served without asking upstream. Default `5m`.
    pub manifest_ttl: HumanDuration,
    /// Per-tag overrides of `manifest_ttl`; the first matching rule wins.
    pub ttl: Vec<TtlRule>,
    /// How long an upstream `404` for a manifest (by tag or digest) is answered without
    /// asking again, per (registry, repository, reference, credential). `0s`: never.
    /// Default `30s`.
    pub negative_ttl: HumanDuration,
    /// Ask no registry anything: every request is answered as when upstream is unreachable
    /// (the shared tier is still used).
    pub offline: bool,
    /// Who may read cached content: `upstream` (upstream must have let this client read the
    /// repository) or `none` (UNSAFE: anyone who reaches the proxy gets every cached object).
    pub auth_check: AuthCheck,
    /// How long an upstream "yes" for (registry, repository, credential) is trusted. Default `5m`.
    pub auth_ttl: HumanDuration,
    /// How long a repository seen readable without credentials is served to anyone without
    /// asking upstream. Default `1h`.
    pub public_ttl: HumanDuration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: "cache".into(),
            max_manifest_size: Size(4 << 20),
            max_size: Size(50 << 30),
            min_free: Size(1 << 30),
            max_concurrent_fills: 64,
            manifest_ttl: HumanDuration(Duration::from_secs(300)),
            ttl: Vec::new(),
            negative_ttl: HumanDuration(Duration::from_secs(30)),
            offline: false,
            auth_check: AuthCheck::Upstream,
            auth_ttl: HumanDuration(Duration::from_secs(300)),
            public_ttl: HumanDuration(Duration::from_secs(3600)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthCheck {
    Upstream,
    None,
}

/// `[[cache.ttl]] tag = "v*"  registry = "quay.io"  ttl = "7d"`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtlRule {
    /// Tag glob; `*` matches any run of characters.
    pub tag: String,
    /// Limit the rule to one registry host.
    #[serde(default)]
    pub registry: Option<String>,
    pub ttl: HumanDuration,
}

/// Matches `text` against a glob where `*` is any run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// A repository pattern: `/`-separated components of lowercase name characters and `*`,
/// or `**` alone as a component.
fn valid_repo_pattern(p: &str) -> bool {
    !p.is_empty()
        && p.split('/').all(|c| {
            c == "**"
                || (!c.is_empty()
                    && !c.contains("**")
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-*".contains(&b)
                    }))
        })
}

/// Whether repository `name` matches `pattern`: `*` matches within one path component,
/// `**` any number of whole components (none included).
pub fn repo_glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[&str], n: &[&str]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((&"**", rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((c, rest)) => n
                .split_first()
                .is_some_and(|(m, tail)| glob_match(c, m) && go(rest, tail)),
        }
    }
    let p: Vec<&str> = pattern.split('/').collect();
    let n: Vec<&str> = name.split('/').collect();
    go(&p, &n)
}

/// Which repositories of one registry may be proxied (`[[registry]] allow` / `deny`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepoFilter {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl RepoFilter {
    /// `Err(rule)` when `repo` may not be proxied, naming the rule that says so.
    pub fn check(&self, repo: &str) -> Result<(), String> {
        if let Some(p) = self.deny.iter().find(|p| repo_glob(p, repo)) {
            return Err(format!("deny = {p:?}"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|p| repo_glob(p, repo)) {
            return Err(format!("not in allow = {:?}", self.allow));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// PEM files with extra roots trusted for upstream TLS, besides the public web PKI.
    pub extra_ca: Vec<PathBuf>,
    /// TCP connect timeout. Default `10s`.
    pub connect_timeout: HumanDuration,
    /// Time to wait for an upstream's response headers. Default `60s`.
    pub response_timeout: HumanDuration,
    /// An upstream body that sends nothing for this long is abandoned. Default `60s`.
    pub idle_timeout: HumanDuration,
    /// Redirects followed for one request (blob storage). Default `5`.
    pub max_redirects: u32,
    /// Host name → address pins (one address or a list, tried in order with IPv4/IPv6
    /// fallback); the port of the request is kept.
    pub resolve: BTreeMap<String, IpList>,
    /// Corporate proxy for all upstream connections, e.g. `http://proxy.corp:3128`.
    /// Unset: taken from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` in Stowage's environment.
    /// `""`: never use a proxy.
    pub proxy: Option<String>,
    /// Hosts reached directly, bypassing `proxy` (curl's NO_PROXY syntax).
    pub no_proxy: String,
    /// How long system DNS answers are reused. Default `60s`.
    pub dns_ttl: HumanDuration,
    /// When an account's share of pulls left (Docker Hub's `ratelimit-remaining` of
    /// `ratelimit-limit`) drops below this, tags are served from the cache without
    /// revalidation until the window has passed. `"0%"`: never. Default `"10%"`.
    pub quota_reserve: Percent,
}

/// A share written as a percentage, `"10%"` (0 to 100).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<f64>().ok())
            .filter(|n| (0.0..=100.0).contains(n))
            .map(|n| Percent(n / 100.0))
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a percentage from \"0%\" to \"100%\", like \"10%\""
                ))
            })
    }
}

/// One address or a list of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpList(pub Vec<IpAddr>);

impl<'de> Deserialize<'de> for IpList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(IpAddr),
            Many(Vec<IpAddr>),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected an IP address or a list of IP addresses")
        })? {
            Raw::One(ip) => Ok(IpList(vec![ip])),
            Raw::Many(v) if !v.is_empty() => Ok(IpList(v)),
            Raw::Many(_) => Err(serde::de::Error::custom("the address list is empty")),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            extra_ca: Vec::new(),
            connect_timeout: HumanDuration(Duration::from_secs(10)),
            response_timeout: HumanDuration(Duration::from_secs(60)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            max_redirects: 5,
            quota_reserve: Percent(0.1),
            resolve: BTreeMap::new(),
            proxy: None,
            no_proxy: String::new(),
            dns_ttl: HumanDuration(Duration::from_secs(60)),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The registry's API host, e.g. `quay.io`, with `:port` when it is not 443. Only this
    /// registry (scheme, host and port) gets the account below.
    pub host: String,
    /// Token or auth hosts this registry sends clients to; their TLS is terminated too.
    #[serde(default)]
    pub auth_hosts: Vec<String>,
    /// Account used upstream for clients that send no credentials of their own.
    #[serde(default)]
    pub username: Option<String>,
    /// Environment variable holding the password or access token.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password or access token (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Add these credentials to clients' anonymous token requests to the auth hosts.
    /// Default: on when credentials are set.
    #[serde(default)]
    pub inject_credentials: Option<bool>,
    /// Overrides `[cache] manifest_ttl` for this registry.
    #[serde(default)]
    pub manifest_ttl: Option<HumanDuration>,
    /// Repository patterns that may be proxied (`*` within a path component, `**` across
    /// components); empty: every repository. `deny` wins over `allow`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Repository patterns that are never proxied.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// A registry account. The password never appears in `Debug` output or logs.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    password: String,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    /// `Basic base64(user:password)`, marked sensitive so hyper never logs it.
    pub fn basic(&self) -> http::HeaderValue {
        use base64::Engine;
        let raw = format!("{}:{}", self.username, self.password);
        let mut v = http::HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        ))
        .expect("base64 is ascii");
        v.set_sensitive(true);
        v
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl RegistryConfig {
    /// The registry this entry configures (validated: `host` is `name[:port]`, HTTPS).
    pub fn registry(&self) -> Registry {
        self.host.parse().expect("validated registry host")
    }

    /// The configured auth hosts as origins (HTTPS, port 443 unless written).
    pub fn auth_origins(&self) -> Vec<Registry> {
        self.auth_hosts
            .iter()
            .filter_map(|h| Registry::from_authority(Scheme::Https, h).ok())
            .collect()
    }

    /// Reads the configured password now (environment or file).
    pub fn credentials(&self, index: usize) -> Result<Option<Credentials>, ConfigError> {
        let Some(user) = &self.username else {
            return Ok(None);
        };
        let key = format!("registry[{index}]");
        let password = match (&self.password_env, &self.password_file) {
            (Some(var), None) => std::env::var(var).map_err(|_| {
                invalid(
                    format!("{key}.password_env"),
                    format!("environment variable {var} is not set"),
                )
            })?,
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    invalid(
                        format!("{key}.password_file"),
                        format!("{}: {e}", path.display()),
                    )
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            _ => unreachable!("validate() requires exactly one password source"),
        };
        Ok(Some(Credentials::new(user.clone(), password)))
    }

    pub fn inject(&self) -> bool {
        self.inject_credentials.unwrap_or(self.username.is_some())
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The registries every Stowage knows without configuration.
pub fn builtin_registries() -> Vec<RegistryConfig> {
    let r = |host: &str, auth: &[&str]| RegistryConfig {
        host: host.into(),
        auth_hosts: auth.iter().map(|s| s.to_string()).collect(),
        username: None,
        password_env: None,
        password_file: None,
        inject_credentials: None,
        manifest_ttl: None,
        allow: Vec::new(),
        deny: Vec::new(),
    };
    vec![
        r("registry-1.docker.io", &["auth.docker.io"]),
        r("quay.io", &[]),
        r("gcr.io", &[]),
        r("k8s.gcr.io", &[]),
        r("registry.k8s.io", &[]),
        r("ghcr.io", &[]),
    ]
}

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a file. Relative paths inside stay relative to the
    /// working directory, as the README documents.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml_str(&text).map_err(|error| ConfigError::InFile {
            path: path.to_owned(),
            error: Box::new(error),
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.proxy_listen()?;
        self.prefetch.validate()?;
        for (key, d) in [
            ("proxy.idle_timeout", self.proxy.idle_timeout),
            ("proxy.header_timeout", self.proxy.header_timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.response_timeout", self.upstream.response_timeout),
            ("upstream.idle_timeout", self.upstream.idle_timeout),
        ] {
            if d.0.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if !(1..=20).contains(&self.upstream.max_redirects) {
            return Err(invalid(
                "upstream.max_redirects",
                "must be between 1 and 20",
            ));
        }
        for (i, r) in self.registry.iter().enumerate() {
            let registry = match r.host.parse::<Registry>() {
                Ok(reg) if r.host == r.host.to_ascii_lowercase() => reg,
                _ => {
                    return Err(invalid(
                        format!("registry[{i}].host"),
                        format!(
                        "{:?} is not a registry like quay.io or registry.local:5000 (lowercase)",
                        r.host
                    ),
                    ))
                }
            };
            for h in &r.auth_hosts {
                if !(valid_host(h) || h.parse::<Registry>().is_ok_and(|a| a.is_https())) {
                    return Err(invalid(
                        format!("registry[{i}].auth_hosts"),
                        format!("{h:?} is not a lowercase host name (optionally with :port)"),
                    ));
                }
            }
            for (field, patterns) in [("allow", &r.allow), ("deny", &r.deny)] {
                if let Some(p) = patterns.iter().find(|p| !valid_repo_pattern(p)) {
                    return Err(invalid(
                        format!("registry[{i}].{field}"),
                        format!("{p:?} is not a repository pattern like \"library/*\" or \"myorg/**\" (lowercase path components; * within one, ** for any number)"),
                    ));
                }
            }
            if r.username.is_some() && !registry.is_https() {
                return Err(invalid(
                    format!("registry[{i}].username"),
                    "credentials are only ever sent over TLS: this registry is plain http://",
                ));
            }
            match (&r.username, &r.password_env, &r.password_file) {
                (Some(_), Some(_), None) | (Some(_), None, Some(_)) | (None, None, None) => {}
                (Some(_), None, None) => {
                    return Err(invalid(format!("registry[{i}]"), "username needs password_env or password_file (inline passwords are not supported)"))
                }
                (Some(_), Some(_), Some(_)) => {
                    return Err(invalid(format!("registry[{i}]"), "set only one of password_env and password_file"))
                }
                (None, _, _) => return Err(invalid(format!("registry[{i}].username"), "a password source needs a username")),
            }
            if r.manifest_ttl.is_some_and(|t| t.0.is_zero()) {
                return Err(invalid(
                    format!("registry[{i}].manifest_ttl"),
                    "must be greater than zero",
                ));
            }
        }
        for (i, rule) in self.cache.ttl.iter().enumerate() {
            if let Some(r) = &rule.registry {
                if r.parse::<Registry>().is_err() {
                    return Err(invalid(
                        format!("cache.ttl[{i}].registry"),
                        format!("{r:?} is not a registry like quay.io or registry.local:5000"),
                    ));
                }
            }
            if rule.tag.is_empty() {
                return Err(invalid(
                    format!("cache.ttl[{i}].tag"),
                    "must not be empty (use \"*\" for every tag)",
                ));
            }
        }
        if let Some(p) = self.upstream.proxy.as_deref().filter(|p| !p.is_empty()) {
            let ok = p
                .parse::<http::Uri>()
                .ok()
                .is_some_and(|u| u.scheme_str() == Some("http") && u.host().is_some());
            if !ok {
                return Err(invalid(
                    "upstream.proxy",
                    format!("{p:?} is not a URL like http://proxy.corp:3128"),
                ));
            }
        }
        for host in self.upstream.resolve.keys() {
            if !valid_host(host) {
                return Err(invalid(
                    "upstream.resolve",
                    format!("{host:?} is not a lowercase host name"),
                ));
            }
        }
        self.mirror_listen()?;
        self.direct_listen()?;
        if self.mirror.tls == MirrorTls::Files
            && (self.mirror.cert_file.is_none() || self.mirror.key_file.is_none())
        {
            return Err(invalid(
                "mirror.tls",
                "\"files\" needs mirror.cert_file and mirror.key_file",
            ));
        }
        // `host` or `host:port`, as the mirror's router reads it (a registry on another port).
        let default_ok = Registry::from_reference_domain(&self.mirror.default_registry).is_ok()
            && match self.mirror.default_registry.rsplit_once(':') {
                Some((host, port)) if !host.contains(':') => {
                    valid_host(host) && port.parse::<u16>().is_ok_and(|p| p > 0)
                }
                _ => valid_host(&self.mirror.default_registry),
            };
        if !default_ok {
            return Err(invalid(
                "mirror.default_registry",
                "must be a lowercase host name, optionally with :port",
            ));
        }
        if !valid_host(&self.mirror.hostname) {
            return Err(invalid("mirror.hostname", "must be a lowercase host name"));
        }
        for (i, u) in self.mirror.user.iter().enumerate() {
            if u.password_env.is_some() == u.password_file.is_some() {
                return Err(invalid(
                    format!("mirror.user[{i}]"),
                    "set exactly one of password_env and password_file",
                ));
            }
        }
        match self.storage.backend {
            BackendKind::S3 => {
                let b = &self.storage.bucket;
                let ok = (3..=63).contains(&b.len())
                    && b.bytes().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.'
                    });
                if !ok {
                    return Err(invalid(
                        "storage.bucket",
                        "needs a bucket name (3-63 lowercase letters, digits, '-', '.')",
                    ));
                }
                if !self
                    .storage
                    .prefix
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c))
                    || self.storage.prefix.contains("..")
                {
                    return Err(invalid(
                        "storage.prefix",
                        "may hold letters, digits, '-', '_', '.', '/' only",
                    ));
                }
            }
            BackendKind::Dir if self.storage.dir.is_none() => {
                return Err(invalid(
                    "storage.dir",
                    "backend = \"dir\" needs a directory",
                ))
            }
            _ => {}
        }
        if self.proxy.max_connections == 0 {
            return Err(invalid(
                "proxy.max_connections",
                "must be greater than zero",
            ));
        }
        if self.cache.max_concurrent_fills == 0 {
            return Err(invalid(
                "cache.max_concurrent_fills",
                "must be greater than zero",
            ));
        }
        if self.cache.max_size.0 == 0 {
            return Err(invalid("cache.max_size", "must be greater than zero"));
        }
        if self.cache.dir.as_os_str().is_empty() {
            return Err(invalid("cache.dir", "must not be empty"));
        }
        if self.ca.dir.as_os_str().is_empty() {
            return Err(invalid("ca.dir", "must not be empty"));
        }
        Ok(())
    }

    pub fn mirror_listen(&self) -> Result<Option<SocketAddr>, ConfigError> {
        optional_addr("mirror.listen", &self.mirror.listen)
    }

    pub fn direct_listen(&self) -> Result<Option<SocketAddr>, ConfigError> {
        optional_addr("direct.listen", &self.direct.listen)
    }

    /// The mirror's accounts, passwords read now.
    pub fn mirror_users(&self) -> Result<Vec<Credentials>, ConfigError> {
        let mut out = Vec::new();
        for (i, u) in self.mirror.user.iter().enumerate() {
            let r = RegistryConfig {
                host: String::new(),
                auth_hosts: Vec::new(),
                username: Some(u.username.clone()),
                password_env: u.password_env.clone(),
                password_file: u.password_file.clone(),
                inject_credentials: None,
                manifest_ttl: None,
                allow: Vec::new(),
                deny: Vec::new(),
            };
            let c = r.credentials(i).map_err(|e| match e {
                ConfigError::Invalid { key, message } => {
                    invalid(key.replace("registry[", "mirror.user["), message)
                }
                e => e,
            })?;
            out.extend(c);
        }
        Ok(out)
    }

    pub fn proxy_listen(&self) -> Result<SocketAddr, ConfigError> {
        self.proxy.listen.parse().map_err(|_| {
            invalid(
                "proxy.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:3128",
                    self.proxy.listen
                ),
            )
        })
    }

    /// Built-in registries merged with configured ones: a configured entry for a built-in
    /// host replaces it (keeping the built-in auth hosts when it names none).
    pub fn registries(&self) -> Vec<RegistryConfig> {
        let mut all = builtin_registries();
        for r in &self.registry {
            match all.iter_mut().find(|b| b.registry() == r.registry()) {
                Some(b) => {
                    let auth_hosts = if r.auth_hosts.is_empty() {
                        b.auth_hosts.clone()
                    } else {
                        r.auth_hosts.clone()
                    };
                    *b = RegistryConfig {
                        auth_hosts,
                        ..r.clone()
                    };
                }
                None => all.push(r.clone()),
            }
        }
        all
    }

    /// The repository filters of every registry that has one.
    pub fn repo_filters(&self) -> std::collections::HashMap<Registry, RepoFilter> {
        self.registries()
            .into_iter()
            .filter(|r| !r.allow.is_empty() || !r.deny.is_empty())
            .map(|r| {
                let filter = RepoFilter {
                    allow: r.allow.clone(),
                    deny: r.deny.clone(),
                };
                (r.registry(), filter)
            })
            .collect()
    }

    /// The tag TTL rules, parsed once (validated: every rule's registry parses).
    pub fn tag_ttls(&self) -> TagTtl {
        TagTtl {
            rules: self
                .cache
                .ttl
                .iter()
                .map(|rule| {
                    let registry = rule
                        .registry
                        .as_deref()
                        .map(|r| r.parse::<Registry>().expect("validated ttl registry"));
                    (registry, rule.tag.clone(), rule.ttl.0)
                })
                .collect(),
            per_registry: self
                .registry
                .iter()
                .filter_map(|r| r.manifest_ttl.map(|t| (r.registry(), t.0)))
                .collect(),
            default: self.cache.manifest_ttl.0,
        }
    }
}

/// How long a tag is fresh: the first matching `[[cache.ttl]]` rule, else the registry's
/// own `manifest_ttl`, else `[cache] manifest_ttl`.
#[derive(Clone, Debug)]
pub struct TagTtl {
    pub rules: Vec<(Option<Registry>, String, Duration)>,
    pub per_registry: std::collections::HashMap<Registry, Duration>,
    pub default: Duration,
}

impl TagTtl {
    pub fn ttl(&self, registry: &Registry, tag: &str) -> Duration {
        for (r, pattern, ttl) in &self.rules {
            if r.as_ref().is_none_or(|r| r == registry) && glob_match(pattern, tag) {
                return *ttl;
            }
        }
        self.per_registry
            .get(registry)
            .copied()
            .unwrap_or(self.default)
    }
}

fn optional_addr(key: &str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| {
        invalid(
            key,
            format!("{value:?} is not an address like 0.0.0.0:5000"),
        )
    })
}

/// A host already in its normal form (see `oci::Host`): lowercase, no trailing dot.
pub fn valid_host(h: &str) -> bool {
    Host::parse(h).is_ok_and(|n| n.as_str() == h || h.parse::<IpAddr>().is_ok())
}

/// The longest duration a configuration may hold: a century. Every duration becomes a
/// deadline (`Instant + d`) or a cache TTL, and moka panics on a TTL over 1000 years.
const MAX_DURATION_MS: u64 = 36_500 * 86_400_000;

/// A duration written as people write them: `250ms`, `30s`, `10m`, `2h`, `7d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like 30s or 10m"))?;
        let ms = match unit.trim() {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("{s:?}: unit must be one of ms, s, m, h, d")),
        };
        let total = n
            .checked_mul(ms)
            .filter(|&t| t <= MAX_DURATION_MS)
            .ok_or_else(|| format!("{s:?} is too long (at most 36500d)"))?;
        Ok(HumanDuration(Duration::from_millis(total)))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A byte count written as `512MiB`, `1.5GiB`, `10MB` or `4096B`. The unit is required:
/// `max_size = 50` could mean 50 bytes or 50 GiB, so it is refused with a message that
/// shows `"50GiB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

const SIZE_UNITS: &str = "B, KiB, MiB, GiB, TiB, KB, MB, GB, TB";

/// The refusal of a number without a unit, `n` as written.
fn size_without_unit(n: &str) -> String {
    format!("a size needs a unit: write \"{n}GiB\" or \"{n}MiB\" (\"{n}B\" for bytes), in quotes")
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let not_a_size = || format!("{s:?} is not a size like 512MiB, 1.5GiB or 50GiB");
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        let digits = |t: &str| t.bytes().all(|c| c.is_ascii_digit());
        if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
            return Err(not_a_size());
        }
        let mult: u64 = match unit.trim() {
            "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            "" => return Err(format!("{s:?}: {}", size_without_unit(num))),
            _ => return Err(format!("{s:?}: the unit must be one of {SIZE_UNITS}")),
        };
        // Exact: the whole part times the unit, plus the fraction of a unit (rounded down
        // to a byte). 19 fraction digits are more than any unit here can use.
        let frac = &frac[..frac.len().min(19)];
        let whole = int.parse::<u128>().unwrap_or(0) * mult as u128;
        let part = match frac.is_empty() {
            true => 0,
            false => {
                frac.parse::<u128>().map_err(|_| not_a_size())? * mult as u128
                    / 10u128.pow(frac.len() as u32)
            }
        };
        u64::try_from(whole + part)
            .map(Size)
            .map_err(|_| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            F(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Err(serde::de::Error::custom(size_without_unit(&n.to_string()))),
            Raw::F(f) => Err(serde::de::Error::custom(size_without_unit(&f.to_string()))),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_config_parses_and_matches_defaults() {
        let c = Config::from_toml_str(DEFAULT_TOML).unwrap();
        let d = Config::default();
        assert_eq!(c.proxy.listen, d.proxy.listen);
        assert_eq!(c.cache.dir, d.cache.dir);
        assert_eq!(c.ca.dir, d.ca.dir);
        assert_eq!(c.upstream.connect_timeout, d.upstream.connect_timeout);
        assert_eq!(c.proxy.other_hosts, OtherHosts::Tunnel);
    }

    #[test]
    fn durations_beyond_a_century_are_config_errors() {
        // Found by fuzz/config: `auth_ttl = "99999999999d"` validated, then moka panicked
        // in `Server::bind` ("time_to_live is longer than 1000 years").
        for key in [
            "[cache]\nauth_ttl",
            "[cache]\npublic_ttl",
            "[upstream]\ndns_ttl",
            "[proxy]\nheader_timeout",
        ] {
            let text = format!("{key} = \"99999999999d\"\n");
            let e = Config::from_toml_str(&text).unwrap_err().to_string();
            assert!(e.contains("too long"), "{text}: {e}");
            assert!(Config::from_toml_str(&format!("{key} = \"36500d\"\n")).is_ok());
            assert!(Config::from_toml_str(&format!("{key} = \"36501d\"\n")).is_err());
        }
    }

    #[test]
    fn prefetch_images_and_platforms_are_checked_and_named() {
        let c = Config::from_toml_str(
            "[prefetch]\nimages = [\"alpine:3\", \"quay.io/org/app:1.2\"]\ninterval = \"1h\"\nplatforms = [\"linux/arm/v7\"]\n",
        )
        .unwrap();
        assert_eq!(c.prefetch.image_refs().len(), 2);
        assert_eq!(c.prefetch.platform_list()[0].to_string(), "linux/arm/v7");
        assert_eq!(Config::default().prefetch.platform_list().len(), 2);
        for (text, key) in [
            ("images = [\"alpine:3\", \"UPPER/x\"]", "prefetch.images[1]"),
            ("platforms = [\"linux\"]", "prefetch.platforms[0]"),
            ("platforms = []", "prefetch.platforms"),
            ("interval = \"0s\"", "prefetch.interval"),
        ] {
            let e = Config::from_toml_str(&format!("[prefetch]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("{key}:")), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e =
            Config::from_toml_str("[proxy]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n").unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
        let e = Config::from_toml_str("[cach]\n").unwrap_err();
        assert!(e.to_string().contains("cach"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let e = Config::from_toml_str("[proxy]\nlisten = \"nope\"\n").unwrap_err();
        assert!(e.to_string().contains("proxy.listen"), "{e}");
        let e = Config::from_toml_str("[[registry]]\nhost = \"Bad_Host\"\n").unwrap_err();
        assert!(e.to_string().contains("registry[0].host"), "{e}");
        let e = Config::from_toml_str("[upstream]\nconnect_timeout = \"5 parsecs\"\n").unwrap_err();
        assert!(e.to_string().contains("connect_timeout"), "{e}");
        let e =
            Config::from_toml_str("[upstream.resolve]\n\"quay.io\" = \"not-an-ip\"\n").unwrap_err();
        assert!(
            e.to_string().contains("quay.io") || e.to_string().contains("resolve"),
            "{e}"
        );
    }

    #[test]
    fn the_mirrors_default_registry_may_name_a_port() {
        for ok in [
            "registry-1.docker.io",
            "registry.local:5000",
            "10.0.0.5:5443",
        ] {
            let c = Config::from_toml_str(&format!("[mirror]\ndefault_registry = \"{ok}\"\n"));
            assert!(c.is_ok(), "{ok}: {:?}", c.err());
        }
        for bad in [
            "Docker.IO",
            "registry.local:",
            "registry.local:0",
            "registry.local:99999",
            "a:b:c",
            "",
        ] {
            let e = Config::from_toml_str(&format!("[mirror]\ndefault_registry = \"{bad}\"\n"))
                .unwrap_err();
            assert!(
                e.to_string().contains("mirror.default_registry"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn allow_lists_parse_cidrs() {
        let c = Config::from_toml_str("[proxy]\nallow = [\"10.0.0.0/8\", \"::1/128\"]\n").unwrap();
        assert!(c.proxy.allow[0].contains(&"10.1.2.3".parse::<IpAddr>().unwrap()));
        let e = Config::from_toml_str("[proxy]\nallow = [\"10.0.0.0/33\"]\n").unwrap_err();
        assert!(
            e.to_string().contains("allow") || e.to_string().contains("invalid"),
            "{e}"
        );
    }

    #[test]
    fn resolve_pins_take_one_address_or_a_list() {
        let c = Config::from_toml_str(
            "[upstream.resolve]\n\"a.io\" = \"127.0.0.1\"\n\"b.io\" = [\"::1\", \"127.0.0.2\"]\n",
        )
        .unwrap();
        assert_eq!(c.upstream.resolve["a.io"].0.len(), 1);
        assert_eq!(c.upstream.resolve["b.io"].0.len(), 2);
        assert!(Config::from_toml_str("[upstream.resolve]\n\"b.io\" = []\n").is_err());
        assert!(Config::from_toml_str("[upstream]\nproxy = \"socks://x\"\n")
            .unwrap_err()
            .to_string()
            .contains("upstream.proxy"));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!("50GiB".parse::<Size>().unwrap(), Size(50 << 30));
        assert_eq!("10MB".parse::<Size>().unwrap(), Size(10_000_000));
        assert_eq!("123B".parse::<Size>().unwrap(), Size(123));
        assert_eq!("1.5GiB".parse::<Size>().unwrap(), Size(3 << 29));
        assert_eq!("0.5KiB".parse::<Size>().unwrap(), Size(512));
        assert_eq!("2.25 MB".parse::<Size>().unwrap(), Size(2_250_000));
        assert_eq!(".5MiB".parse::<Size>().unwrap(), Size(1 << 19));
        let e = "123".parse::<Size>().unwrap_err();
        assert!(e.contains("\"123GiB\""), "{e}");
        for bad in ["5XB", "1.2.3GiB", ".GiB", "GiB", "", "-1GiB", "1e3B"] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
        let e = Config::from_toml_str("[cache]\nmax_size = 50\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"50GiB\"") && e.contains("max_size"), "{e}");
        let e = Config::from_toml_str("[cache]\nmax_size = 1.5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"1.5GiB\""), "{e}");
        let c = Config::from_toml_str("[cache]\nmax_size = \"1.5GiB\"\n").unwrap();
        assert_eq!(c.cache.max_size, Size(3 << 29));
        assert!("99999999999TiB".parse::<Size>().is_err());
        assert_eq!(
            "10m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(600)
        );
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(250)
        );
        assert!("10".parse::<HumanDuration>().is_err());
        assert!("m".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn credentials_come_from_env_or_file_never_inline() {
        let e = Config::from_toml_str("[[registry]]\nhost = \"quay.io\"\nusername = \"u\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("password_env"), "{e}");
        let e = Config::from_toml_str(
            "[[registry]]\nhost = \"quay.io\"\nusername = \"u\"\npassword = \"x\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("password"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let c = Config::from_toml_str(&format!(
            "[[registry]]\nhost = \"quay.io\"\nusername = \"u\"\npassword_file = {:?}\n",
            f
        ))
        .unwrap();
        let creds = c.registry[0].credentials(0).unwrap().unwrap();
        assert_eq!(creds.basic(), "Basic dTpzM2NyZXQ=");
        assert!(!format!("{creds:?}").contains("s3cret"));
        assert!(c.registry[0].inject());
        let c = Config::from_toml_str("[[registry]]\nhost = \"quay.io\"\nusername = \"u\"\npassword_env = \"STOWAGE_TEST_UNSET_VAR\"\n").unwrap();
        let e = c.registry[0].credentials(0).unwrap_err();
        assert!(e.to_string().contains("STOWAGE_TEST_UNSET_VAR"), "{e}");
    }

    #[test]
    fn quota_reserve_is_a_percentage() {
        let c = Config::from_toml_str("[upstream]\nquota_reserve = \"25%\"\n").unwrap();
        assert_eq!(c.upstream.quota_reserve, Percent(0.25));
        assert_eq!(Config::default().upstream.quota_reserve, Percent(0.1));
        for bad in ["10", "\"10\"", "\"101%\"", "\"-1%\"", "\"x%\""] {
            let toml = format!("[upstream]\nquota_reserve = {bad}\n");
            assert!(Config::from_toml_str(&toml).is_err(), "{bad}");
        }
    }

    #[test]
    fn repository_patterns_match_by_path_component() {
        for (p, n, m) in [
            ("library/*", "library/alpine", true),
            ("library/*", "library/a/b", false),
            ("library/*", "library", false),
            ("myorg/**", "myorg/a/b/c", true),
            ("myorg/**", "myorg", true),
            ("myorg/**", "myorgx/a", false),
            ("**/base", "a/b/base", true),
            ("**/base", "base", true),
            ("**", "anything/at/all", true),
            ("team-*/app", "team-red/app", true),
            ("team-*/app", "team-red/x/app", false),
            ("exact/name", "exact/name", true),
            ("exact/name", "exact/name2", false),
        ] {
            assert_eq!(repo_glob(p, n), m, "{p} vs {n}");
        }
        let f = RepoFilter {
            allow: vec!["library/*".into(), "myorg/**".into()],
            deny: vec!["myorg/secret/**".into()],
        };
        assert_eq!(f.check("library/alpine"), Ok(()));
        assert_eq!(f.check("myorg/a/b"), Ok(()));
        assert_eq!(
            f.check("myorg/secret/x").unwrap_err(),
            r#"deny = "myorg/secret/**""#
        );
        assert!(f.check("other/x").unwrap_err().starts_with("not in allow"));
        assert_eq!(RepoFilter::default().check("any/thing"), Ok(()));
        for bad in ["", "a//b", "Upper/x", "a/**b", "a b"] {
            let toml = format!("[[registry]]\nhost = \"quay.io\"\ndeny = [{bad:?}]\n");
            let e = Config::from_toml_str(&toml).unwrap_err().to_string();
            assert!(e.contains("registry[0].deny"), "{bad:?}: {e}");
        }
        let c = Config::from_toml_str(
            "[[registry]]\nhost = \"registry-1.docker.io\"\nallow = [\"library/*\"]\n",
        )
        .unwrap();
        let hub: Registry = "registry-1.docker.io".parse().unwrap();
        assert_eq!(c.repo_filters()[&hub].allow, ["library/*"]);
        assert_eq!(c.repo_filters().len(), 1);
    }

    #[test]
    fn tag_ttls_by_rule_registry_and_default() {
        let c = Config::from_toml_str(
            "[cache]\nmanifest_ttl = \"5m\"\n[[cache.ttl]]\ntag = \"v*\"\nttl = \"7d\"\n[[cache.ttl]]\ntag = \"*\"\nregistry = \"gcr.io\"\nttl = \"1m\"\n[[registry]]\nhost = \"quay.io\"\nmanifest_ttl = \"30s\"\n",
        )
        .unwrap();
        let r = |s: &str| s.parse::<Registry>().unwrap();
        let c_ttl = c.tag_ttls();
        assert_eq!(
            c_ttl.ttl(&r("ghcr.io"), "v1.2"),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(c_ttl.ttl(&r("gcr.io"), "latest"), Duration::from_secs(60));
        assert_eq!(
            c_ttl.ttl(&r("gcr.io:5000"), "latest"),
            Duration::from_secs(300)
        );
        assert_eq!(c_ttl.ttl(&r("quay.io"), "latest"), Duration::from_secs(30));
        assert_eq!(c_ttl.ttl(&r("ghcr.io"), "latest"), Duration::from_secs(300));
        // A configured built-in keeps its auth hosts.
        let c = Config::from_toml_str(
            "[[registry]]\nhost = \"registry-1.docker.io\"\nmanifest_ttl = \"1m\"\n",
        )
        .unwrap();
        let hub = c
            .registries()
            .into_iter()
            .find(|r| r.host == "registry-1.docker.io")
            .unwrap();
        assert_eq!(hub.auth_hosts, ["auth.docker.io"]);
        assert!(
            glob_match("a*b*c", "aXXbYYc") && !glob_match("a*b*c", "acb") && glob_match("*", "")
        );
    }

    #[test]
    fn configured_registries_extend_the_builtins() {
        let c = Config::from_toml_str(
            "[[registry]]\nhost = \"registry.example.com\"\nauth_hosts = [\"auth.example.com\"]\n",
        )
        .unwrap();
        let all = c.registries();
        assert!(all.iter().any(|r| r.host == "quay.io"));
        assert!(all
            .iter()
            .any(|r| r.host == "registry.example.com" && r.auth_hosts == ["auth.example.com"]));
    }
}
