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

/// The configuration shipped in the repository's `config.toml`, embedded so the binary
/// documents itself (`stowage config`).
pub const DEFAULT_TOML: &str = include_str!("../config.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
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
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:3128".into(),
            other_hosts: OtherHosts::Tunnel,
            idle_timeout: HumanDuration(Duration::from_secs(120)),
            header_timeout: HumanDuration(Duration::from_secs(30)),
            shutdown_grace: HumanDuration(Duration::from_secs(10)),
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
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig { dir: "certs".into() }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Cache directory. Default `cache`.
    pub dir: PathBuf,
    /// Largest manifest that is cached; larger ones are passed through. Default `4MiB`.
    pub max_manifest_size: Size,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { dir: "cache".into(), max_manifest_size: Size(4 << 20) }
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
    /// Host name → address pins; the port of the request is kept.
    pub resolve: BTreeMap<String, IpAddr>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            extra_ca: Vec::new(),
            connect_timeout: HumanDuration(Duration::from_secs(10)),
            response_timeout: HumanDuration(Duration::from_secs(60)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            max_redirects: 5,
            resolve: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The registry's API host, e.g. `quay.io`.
    pub host: String,
    /// Token or auth hosts this registry sends clients to; their TLS is terminated too.
    #[serde(default)]
    pub auth_hosts: Vec<String>,
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
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::from_toml_str(&text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.proxy_listen()?;
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
            return Err(invalid("upstream.max_redirects", "must be between 1 and 20"));
        }
        for (i, r) in self.registry.iter().enumerate() {
            if !valid_host(&r.host) {
                return Err(invalid(format!("registry[{i}].host"), format!("{:?} is not a lowercase host name", r.host)));
            }
            for h in &r.auth_hosts {
                if !valid_host(h) {
                    return Err(invalid(format!("registry[{i}].auth_hosts"), format!("{h:?} is not a lowercase host name")));
                }
            }
        }
        for host in self.upstream.resolve.keys() {
            if !valid_host(host) {
                return Err(invalid("upstream.resolve", format!("{host:?} is not a lowercase host name")));
            }
        }
        if self.cache.dir.as_os_str().is_empty() {
            return Err(invalid("cache.dir", "must not be empty"));
        }
        if self.ca.dir.as_os_str().is_empty() {
            return Err(invalid("ca.dir", "must not be empty"));
        }
        Ok(())
    }

    pub fn proxy_listen(&self) -> Result<SocketAddr, ConfigError> {
        self.proxy
            .listen
            .parse()
            .map_err(|_| invalid("proxy.listen", format!("{:?} is not an address like 127.0.0.1:3128", self.proxy.listen)))
    }

    /// Built-in registries followed by configured ones.
    pub fn registries(&self) -> Vec<RegistryConfig> {
        let mut all = builtin_registries();
        all.extend(self.registry.iter().cloned());
        all
    }
}

/// A DNS name or IP literal as it may appear in `CONNECT`: lowercase letters, digits,
/// `-` and `.`, or an IP address.
pub fn valid_host(h: &str) -> bool {
    if h.parse::<IpAddr>().is_ok() {
        return true;
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// A duration written as people write them: `250ms`, `30s`, `10m`, `2h`, `7d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 30s or 10m"))?;
        let ms = match unit.trim() {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("{s:?}: unit must be one of ms, s, m, h, d")),
        };
        let total = n.checked_mul(ms).ok_or_else(|| format!("{s:?} is too long"))?;
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

/// A byte count written as `512MiB`, `50GiB`, `10MB` or a plain number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size like 512MiB or 50GiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(format!("{s:?}: unit must be one of B, KiB, MiB, GiB, TiB, KB, MB, GB, TB")),
        };
        n.checked_mul(mult).map(Size).ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
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
    fn unknown_keys_are_named() {
        let e = Config::from_toml_str("[proxy]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n").unwrap_err();
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
        let e = Config::from_toml_str("[upstream.resolve]\n\"quay.io\" = \"not-an-ip\"\n").unwrap_err();
        assert!(e.to_string().contains("quay.io") || e.to_string().contains("resolve"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!("50GiB".parse::<Size>().unwrap(), Size(50 << 30));
        assert_eq!("10MB".parse::<Size>().unwrap(), Size(10_000_000));
        assert_eq!("123".parse::<Size>().unwrap(), Size(123));
        assert!("5XB".parse::<Size>().is_err());
        assert!("99999999999TiB".parse::<Size>().is_err());
        assert_eq!("10m".parse::<HumanDuration>().unwrap().0, Duration::from_secs(600));
        assert_eq!("250ms".parse::<HumanDuration>().unwrap().0, Duration::from_millis(250));
        assert!("10".parse::<HumanDuration>().is_err());
        assert!("m".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn configured_registries_extend_the_builtins() {
        let c = Config::from_toml_str("[[registry]]\nhost = \"registry.example.com\"\nauth_hosts = [\"auth.example.com\"]\n").unwrap();
        let all = c.registries();
        assert!(all.iter().any(|r| r.host == "quay.io"));
        assert!(all.iter().any(|r| r.host == "registry.example.com" && r.auth_hosts == ["auth.example.com"]));
    }
}
