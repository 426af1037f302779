//! Request loops: a registry name (or pin, or CONNECT target) that leads back to one of
//! Stowage's own listeners would recurse, and would turn a remote client into a local one.
//! The one check for every way in.

use std::net::{IpAddr, SocketAddr};

use http::{Response, StatusCode};

use crate::http_util::Body;
use crate::oci::Registry;
use crate::registry_api::registry_error;
use crate::upstream::Resolver;

/// The addresses Stowage listens on, after binding.
#[derive(Clone, Debug, Default)]
pub struct OwnAddresses {
    pub listeners: Vec<SocketAddr>,
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl OwnAddresses {
    /// Whether connecting to `addr` can reach one of our listeners: the same address (in
    /// either IPv4 form), a loopback address on the port of an unspecified listen address,
    /// or an unspecified destination (`0.0.0.0`, `::`), which the kernel connects to this
    /// host, on the port of any listener.
    pub fn contains(&self, addr: &SocketAddr) -> bool {
        let ip = canonical_ip(addr.ip());
        self.listeners.iter().any(|own| {
            own.port() == addr.port()
                && (canonical_ip(own.ip()) == ip
                    || ip.is_unspecified()
                    || (own.ip().is_unspecified() && ip.is_loopback()))
        })
    }

    /// A clear `508` when `registry` resolves to one of our listeners.
    pub async fn check(&self, resolver: &Resolver, registry: &Registry) -> Option<Response<Body>> {
        let addrs = resolver
            .resolve(registry.host().as_str(), registry.port())
            .await
            .ok()?;
        let own = addrs.iter().find(|a| self.contains(a))?;
        tracing::error!(%registry, address = %own, "upstream resolves to this Stowage: refusing a request loop");
        Some(registry_error(
            StatusCode::LOOP_DETECTED,
            "UNAVAILABLE",
            &format!(
                "{} resolves to this Stowage ({own}); the proxy host must resolve registries for real, or pin them in [upstream.resolve]",
                registry.host()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_match_loopback_and_mapped_forms() {
        let own = OwnAddresses {
            listeners: vec![
                "0.0.0.0:3128".parse().unwrap(),
                "127.0.0.1:5000".parse().unwrap(),
            ],
        };
        assert!(own.contains(&"127.0.0.1:3128".parse().unwrap()));
        assert!(own.contains(&"[::ffff:127.0.0.1]:5000".parse().unwrap()));
        assert!(own.contains(&"[::ffff:127.0.0.9]:3128".parse().unwrap()));
        assert!(!own.contains(&"127.0.0.1:3129".parse().unwrap()));
        assert!(!own.contains(&"10.0.0.1:5000".parse().unwrap()));
    }

    #[test]
    fn unspecified_destinations_reach_this_host() {
        let own = OwnAddresses {
            listeners: vec![
                "127.0.0.1:3128".parse().unwrap(),
                "[::]:5000".parse().unwrap(),
            ],
        };
        for a in [
            "0.0.0.0:3128",
            "[::]:3128",
            "[::ffff:0.0.0.0]:3128",
            "0.0.0.0:5000",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
            "127.0.0.1:5000",
        ] {
            assert!(own.contains(&a.parse().unwrap()), "{a}");
        }
        assert!(!own.contains(&"0.0.0.0:3129".parse().unwrap()));
        assert!(!own.contains(&"[::1]:3128".parse().unwrap()));
    }
}
