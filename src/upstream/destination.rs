//! Where Stowage may go when someone other than the operator names the place: a redirect's
//! `Location`, a token realm, an absolute-form `http://` URL from a client.
//!
//! Such a destination must not be one of Stowage's own listeners (a request loop, and a
//! remote client turned into a local one, the kind `/admin` answers), nor a loopback,
//! link-local or unspecified address (services that trust the machine they run on, cloud
//! metadata). A name pinned in `[upstream.resolve]` is the operator's explicit decision: its
//! addresses are only checked against the listeners. Every other name is resolved with the
//! resolver the connection will use, and every address it has is checked; a name that
//! does not resolve is refused (it could not be checked), unless an upstream proxy carries
//! the connection and resolves names itself. The connection then uses the answer the check
//! accepted, not a second one (`resolver::CHECKED_TTL`).

use std::net::{IpAddr, SocketAddr};

use http::Uri;

use super::client::Upstream;

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
    /// Whether `addr` is one of our listeners (an unspecified listen address matches every
    /// loopback address on its port).
    pub fn contains(&self, addr: &SocketAddr) -> bool {
        let ip = canonical_ip(addr.ip());
        self.listeners.iter().any(|own| {
            own.port() == addr.port()
                && (canonical_ip(own.ip()) == ip
                    // an unspecified destination (0.0.0.0, ::) connects to this host
                    || ip.is_unspecified()
                    || (own.ip().is_unspecified() && ip.is_loopback()))
        })
    }
}

/// What kind of address an upstream (or a client) may not send Stowage to, if `ip` is one:
/// loopback (127.0.0.0/8, ::1), link-local (169.254.0.0/16, fe80::/10) or unspecified
/// (0.0.0.0/8, ::), IPv4-mapped forms included.
pub fn internal_class(ip: IpAddr) -> Option<&'static str> {
    match canonical_ip(ip) {
        IpAddr::V4(v4) if v4.is_loopback() => Some("loopback"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        // 0.0.0.0/8 is "this network"; connecting to 0.0.0.0 reaches the local host.
        IpAddr::V4(v4) if v4.octets()[0] == 0 => Some("unspecified"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("loopback"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("unspecified"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("link-local"),
        _ => None,
    }
}

/// Why a destination was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} is one of this Stowage's own listeners")]
    OwnListener(SocketAddr),
    #[error(
        "{host} is {addr}, a {class} address (pin the name in [upstream.resolve] to allow it)"
    )]
    Internal {
        host: String,
        addr: IpAddr,
        class: &'static str,
    },
    #[error("https:// to plain http:// is a downgrade")]
    Downgrade,
    #[error("{host} cannot be checked: {message}")]
    Unresolved { host: String, message: String },
}

impl Upstream {
    /// Makes later [`Upstream::check_destination`] calls refuse `own` (set once, after the
    /// listeners are bound).
    pub fn set_own_listeners(&self, own: OwnAddresses) {
        let _ = self.own.set(own);
    }

    /// Whether Stowage may connect to the host and port of `uri` (see the module docs).
    pub async fn check_destination(&self, uri: &Uri) -> Result<(), Refused> {
        let Some(host) = uri.host() else {
            return Err(Refused::Unresolved {
                host: String::new(),
                message: "no host".into(),
            });
        };
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("http") {
                80
            } else {
                443
            });
        let own = self.own.get();
        let pinned = self.resolver.is_pinned(host);
        let addrs = match self.resolver.resolve_for_check(host, port).await {
            Ok(a) => a,
            // The upstream proxy resolves names it carries; Stowage could not check them.
            Err(_) if self.proxy_intercepts(uri) => return Ok(()),
            Err(e) => {
                return Err(Refused::Unresolved {
                    host: host.to_owned(),
                    message: e.to_string(),
                })
            }
        };
        for addr in &addrs {
            if own.is_some_and(|o| o.contains(addr)) {
                return Err(Refused::OwnListener(*addr));
            }
            if pinned {
                continue;
            }
            if let Some(class) = internal_class(addr.ip()) {
                return Err(Refused::Internal {
                    host: host.to_owned(),
                    addr: addr.ip(),
                    class,
                });
            }
        }
        // The connection that follows uses exactly these addresses (no second answer).
        self.resolver.remember_checked(host, &addrs);
        Ok(())
    }

    /// Checks a redirect from `from` to `to`: never from `https://` down to `http://`, and
    /// only to a destination [`Upstream::check_destination`] allows.
    pub(super) async fn check_redirect(&self, from: &Uri, to: &Uri) -> Result<(), Refused> {
        if from.scheme_str() == Some("https") && to.scheme_str() != Some("https") {
            return Err(Refused::Downgrade);
        }
        self.check_destination(to).await
    }

    fn proxy_intercepts(&self, uri: &Uri) -> bool {
        self.proxy
            .as_ref()
            .is_some_and(|m| m.intercept(uri).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DNS rebinding: the check sees a public address; once the DNS cache has let it go,
    /// the name answers loopback. The connection still gets the checked address, and a
    /// name that answers loopback at its check is refused.
    #[tokio::test]
    async fn the_connection_gets_the_address_the_check_accepted() {
        let config = crate::settings::UpstreamConfig::default();
        let mut up =
            Upstream::with_transport(&config, std::sync::Arc::new(super::super::Offline), None);
        up.resolver = super::super::resolver::tests::rebinding(std::time::Duration::from_millis(1));
        let uri: Uri = "https://evil.example/v2/".parse().unwrap();
        up.check_destination(&uri).await.expect("a public address");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(
            up.resolver.resolve("evil.example", 443).await.unwrap(),
            vec!["93.184.216.34:443".parse::<SocketAddr>().unwrap()],
            "the connection resolves to what was checked"
        );

        let mut up =
            Upstream::with_transport(&config, std::sync::Arc::new(super::super::Offline), None);
        up.resolver = super::super::resolver::tests::rebinding(std::time::Duration::from_millis(1));
        let _ = up.resolver.resolve("evil.example", 443).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        match up.check_destination(&uri).await {
            Err(Refused::Internal { class, .. }) => assert_eq!(class, "loopback"),
            other => panic!("a loopback answer passed its check: {other:?}"),
        }
    }

    /// A name checked on every request (a storage host on every miss) still follows DNS:
    /// its checked answer is judged again once it is `checked_ttl` old, not kept alive by
    /// the checks themselves; and the connection after each check uses what it accepted.
    #[tokio::test]
    async fn a_name_checked_all_the_time_still_follows_dns() {
        use std::time::Duration;
        let config = crate::settings::UpstreamConfig::default();
        let mut up =
            Upstream::with_transport(&config, std::sync::Arc::new(super::super::Offline), None);
        up.resolver = super::super::resolver::tests::answers(
            "93.184.216.34",
            "93.184.216.35",
            Duration::from_millis(1),
            Duration::from_millis(50),
        );
        let uri: Uri = "https://storage.example/blob".parse().unwrap();
        let connect = || async { up.resolver.resolve("storage.example", 443).await.unwrap() };
        up.check_destination(&uri).await.unwrap();
        assert_eq!(connect().await, ["93.184.216.34:443".parse().unwrap()]);
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_millis(150) {
            up.check_destination(&uri).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        up.check_destination(&uri).await.unwrap();
        assert_eq!(
            connect().await,
            ["93.184.216.35:443".parse::<SocketAddr>().unwrap()],
            "three checked lifetimes later, the new DNS answer"
        );
    }

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
    fn internal_addresses_are_classified() {
        let class = |s: &str| internal_class(s.parse().unwrap());
        assert_eq!(class("127.0.0.1"), Some("loopback"));
        assert_eq!(class("127.255.0.9"), Some("loopback"));
        assert_eq!(class("::1"), Some("loopback"));
        assert_eq!(class("::ffff:127.0.0.1"), Some("loopback"));
        assert_eq!(class("169.254.169.254"), Some("link-local"));
        assert_eq!(class("::ffff:169.254.1.1"), Some("link-local"));
        assert_eq!(class("fe80::1"), Some("link-local"));
        assert_eq!(class("febf::1"), Some("link-local"));
        assert_eq!(class("0.0.0.0"), Some("unspecified"));
        assert_eq!(class("::"), Some("unspecified"));
        assert_eq!(class("10.0.0.1"), None);
        assert_eq!(class("192.168.1.1"), None);
        assert_eq!(class("fec0::1"), None);
        assert_eq!(class("2001:db8::1"), None);
        assert_eq!(class("8.8.8.8"), None);
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
