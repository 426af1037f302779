//! Which registry: a registry is its scheme, host and port, and nothing else.
//!
//! `https://quay.io:443`, `https://quay.io:5000` and `http://quay.io` are three registries:
//! every key that says what is cached or who may read it carries a [`Registry`], so content
//! and permissions of one can never answer for another. This module is the one normaliser
//! for every place a registry is named: CONNECT targets, absolute-form URIs, `Host`, SNI,
//! containerd's `ns=`, mirror path prefixes and the configuration. Host names are
//! lowercased, a trailing dot is dropped, IPv6 literals lose their brackets; anything that
//! is not a DNS name or an IP literal is refused.
//!
//! The one text form ([`Registry`]'s `Display`/`FromStr`) is what logs, metric labels,
//! `cache ls` and the metadata store use: `quay.io` for HTTPS on 443, `quay.io:5000` for
//! HTTPS on another port, `http://quay.io` or `http://quay.io:8080` for plain HTTP.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error("{0:?} is not a host name or IP address")]
    Host(String),
    #[error("{0:?} is not a port number (1-65535)")]
    Port(String),
    #[error("{0:?} is not a registry like quay.io or registry.local:5000")]
    Registry(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    Https,
    Http,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Https => "https",
            Scheme::Http => "http",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Https => 443,
            Scheme::Http => 80,
        }
    }
}

/// A DNS name or an IP literal in its one normal form.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Host(std::sync::Arc<str>);

impl Host {
    /// Normalises and checks a host as clients write it: any case, an optional trailing
    /// dot, IPv6 in brackets or not.
    pub fn parse(s: &str) -> Result<Host, OriginError> {
        let bare = s
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Host(ip.to_string().into()));
        }
        let lower = bare.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if valid_dns_name(name) {
            Ok(Host(name.into()))
        } else {
            Err(OriginError::Host(s.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn ip(&self) -> Option<IpAddr> {
        self.0.parse().ok()
    }

    /// `host` or `[v6]`, as it goes in an authority.
    fn write_authority(&self, f: &mut impl fmt::Write) -> fmt::Result {
        if self.0.contains(':') {
            write!(f, "[{}]", self.0)
        } else {
            f.write_str(&self.0)
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Host {
    type Err = OriginError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Host::parse(s)
    }
}

fn valid_dns_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// One registry: scheme, host and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Registry {
    scheme: Scheme,
    host: Host,
    port: u16,
}

/// Docker Hub's API host; `docker.io` in image references means it.
pub const DOCKER_HUB: &str = "registry-1.docker.io";

impl Registry {
    pub fn new(scheme: Scheme, host: Host, port: u16) -> Registry {
        Registry { scheme, host, port }
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::Https
    }

    /// `host[:port]` (port defaulting to the scheme's), as in a CONNECT target, a `Host`
    /// header, SNI plus a port, `ns=` or a configuration entry.
    pub fn from_authority(scheme: Scheme, authority: &str) -> Result<Registry, OriginError> {
        let (host, port) = split_authority(authority)?;
        Ok(Registry {
            scheme,
            host: Host::parse(host)?,
            port: port.unwrap_or(scheme.default_port()),
        })
    }

    /// A registry as image references and containerd's `ns=` name it: HTTPS, and the
    /// names users write for Docker Hub (`docker.io`, `index.docker.io`) mean its API host.
    pub fn from_reference_domain(domain: &str) -> Result<Registry, OriginError> {
        let mut r = Registry::from_authority(Scheme::Https, domain)?;
        if matches!(
            r.host.as_str(),
            "docker.io" | "index.docker.io" | "registry.docker.io"
        ) {
            r.host = Host(DOCKER_HUB.into());
        }
        Ok(r)
    }

    /// The registry a URI points at (`None` without a scheme we speak or a host).
    pub fn of_uri(uri: &http::Uri) -> Option<Registry> {
        let scheme = match uri.scheme_str()? {
            "https" => Scheme::Https,
            "http" => Scheme::Http,
            _ => return None,
        };
        let host = Host::parse(uri.host()?).ok()?;
        let port = uri.port_u16().unwrap_or(scheme.default_port());
        Some(Registry { scheme, host, port })
    }

    /// `host` or `host:port` (port left out when it is the scheme's default).
    pub fn authority(&self) -> String {
        let mut s = String::new();
        self.write_authority(&mut s).expect("write to String");
        s
    }

    fn write_authority(&self, f: &mut impl fmt::Write) -> fmt::Result {
        self.host.write_authority(f)?;
        if self.port != self.scheme.default_port() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }

    /// The URI of `path_and_query` on this registry.
    pub fn uri(&self, path_and_query: &str) -> Result<http::Uri, http::uri::InvalidUri> {
        format!(
            "{}://{}{}",
            self.scheme.as_str(),
            self.authority(),
            path_and_query
        )
        .parse()
    }
}

/// Splits `host[:port]` / `[v6][:port]` / a bare IPv6 literal.
fn split_authority(s: &str) -> Result<(&str, Option<u16>), OriginError> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| OriginError::Port(p.chars().take(20).collect()))
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| OriginError::Host(s.into()))?;
        return match after {
            "" => Ok((host, None)),
            p => match p.strip_prefix(':') {
                Some(p) => Ok((host, Some(port(p)?))),
                None => Err(OriginError::Host(s.into())),
            },
        };
    }
    match s.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 literal.
        Some((h, _)) if h.contains(':') => Ok((s, None)),
        Some((h, p)) => Ok((h, Some(port(p)?))),
        None => Ok((s, None)),
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scheme != Scheme::Https {
            write!(f, "{}://", self.scheme.as_str())?;
        }
        self.write_authority(f)
    }
}

impl FromStr for Registry {
    type Err = OriginError;

    /// The `Display` form back; `https://` may be written out too.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, authority) = if let Some(rest) = s.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else {
            (Scheme::Https, s.strip_prefix("https://").unwrap_or(s))
        };
        if authority.contains('/') || authority.is_empty() {
            return Err(OriginError::Registry(s.chars().take(80).collect()));
        }
        Registry::from_authority(scheme, authority)
    }
}

impl serde::Serialize for Registry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Registry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> Registry {
        s.parse().unwrap()
    }

    #[test]
    fn the_port_and_scheme_are_part_of_the_identity() {
        assert_ne!(reg("quay.io"), reg("quay.io:5000"));
        assert_ne!(reg("quay.io"), reg("http://quay.io"));
        assert_eq!(reg("quay.io"), reg("quay.io:443"));
        assert_eq!(reg("quay.io"), reg("https://QUAY.IO.:443"));
        assert_eq!(reg("http://quay.io:80"), reg("http://quay.io"));
        assert_ne!(reg("http://quay.io:443"), reg("quay.io"));
    }

    #[test]
    fn one_text_form_round_trips() {
        for (input, shown) in [
            ("quay.io", "quay.io"),
            ("quay.io:443", "quay.io"),
            ("Quay.IO:5000", "quay.io:5000"),
            ("http://quay.io", "http://quay.io"),
            ("http://quay.io:8080", "http://quay.io:8080"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("[::1]:5000", "[::1]:5000"),
            ("[0:0::1]", "[::1]"),
            ("::1", "[::1]"),
        ] {
            let r = reg(input);
            assert_eq!(r.to_string(), shown, "{input}");
            assert_eq!(reg(&r.to_string()), r, "{input}");
        }
    }

    #[test]
    fn bad_names_and_ports_are_refused() {
        for bad in [
            "",
            "quay.io:",
            "quay.io:0",
            "quay.io:99999",
            "a:b:c.d",
            "quay.io/x",
            "bad_host",
            "[::1",
            "[::1]x",
            "-a.io",
            "ftp://x",
            "http://",
        ] {
            assert!(bad.parse::<Registry>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn every_way_of_naming_a_host_normalises_alike() {
        let want = Host::parse("quay.io").unwrap();
        for s in ["quay.io", "QUAY.io", "quay.io."] {
            assert_eq!(Host::parse(s).unwrap(), want);
        }
        assert_eq!(Host::parse("[::1]").unwrap(), Host::parse("::1").unwrap());
        assert_eq!(
            Host::parse("::ffff:127.0.0.1").unwrap().as_str(),
            "::ffff:127.0.0.1"
        );
    }

    #[test]
    fn docker_hub_names_in_references() {
        for d in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            assert_eq!(
                Registry::from_reference_domain(d).unwrap().to_string(),
                DOCKER_HUB
            );
        }
        assert_eq!(
            Registry::from_reference_domain("quay.io%3A5443").ok(),
            None,
            "callers decode ns= first"
        );
        assert_eq!(
            Registry::from_reference_domain("quay.io:5443")
                .unwrap()
                .to_string(),
            "quay.io:5443"
        );
    }

    #[test]
    fn uris_keep_non_default_ports() {
        assert_eq!(
            reg("quay.io:5443").uri("/v2/?x=1").unwrap().to_string(),
            "https://quay.io:5443/v2/?x=1"
        );
        assert_eq!(
            reg("ghcr.io").uri("/v2/").unwrap().to_string(),
            "https://ghcr.io/v2/"
        );
        assert_eq!(
            reg("[::1]:8443").uri("/v2/").unwrap().to_string(),
            "https://[::1]:8443/v2/"
        );
        let u: http::Uri = "http://Quay.io:80/v2/".parse().unwrap();
        assert_eq!(Registry::of_uri(&u), Some(reg("http://quay.io")));
    }
}
