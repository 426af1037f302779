//! Name resolution for upstream connections: `[upstream.resolve]` pins first (tests,
//! split-horizon DNS), the system resolver otherwise, answers reused for `dns_ttl`.
//!
//! A name someone other than the operator chose (a redirect, a token realm) is checked
//! before Stowage connects to it (`destination`), and the connection then resolves the name
//! again. So that the second answer cannot differ from the checked one (DNS rebinding: a
//! public address for the check, then a loopback one for the connection), the answer a
//! check accepted is what connections to that name use, whatever `dns_ttl` says. Checks
//! judge that same answer until it is [`CHECKED_TTL`] old; the first check after that
//! resolves the name again, so a name checked on every request still follows DNS.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::dns::Name;

/// How long checks of a name judge the answer a check accepted before resolving it again:
/// short enough to follow DNS. Connections use the answer for twice as long, far longer
/// than a check takes to become a connection.
pub const CHECKED_TTL: Duration = Duration::from_secs(30);

/// The system resolver, or a test's.
type Lookup = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>> + Send + Sync,
>;

/// Resolves names through `[upstream.resolve]` pins first, the system resolver otherwise
/// (answers reused for `dns_ttl`).
#[derive(Clone)]
pub struct Resolver {
    pins: Arc<BTreeMap<String, Vec<IpAddr>>>,
    cache: moka::future::Cache<String, Arc<Vec<IpAddr>>>,
    /// Answers destination checks accepted, with when ([`Resolver::remember_checked`]).
    checked: moka::sync::Cache<String, (Arc<Vec<IpAddr>>, std::time::Instant)>,
    /// [`CHECKED_TTL`], or a test's.
    checked_ttl: Duration,
    lookup: Lookup,
}

impl Resolver {
    pub fn new(pins: BTreeMap<String, Vec<IpAddr>>, ttl: Duration) -> Resolver {
        Resolver::with_lookup(
            pins,
            ttl,
            CHECKED_TTL,
            Arc::new(|host: String| {
                Box::pin(async move {
                    Ok(tokio::net::lookup_host((host.as_str(), 0))
                        .await?
                        .map(|a| a.ip())
                        .collect())
                })
            }),
        )
    }

    /// With `lookup` in place of the system resolver.
    fn with_lookup(
        pins: BTreeMap<String, Vec<IpAddr>>,
        ttl: Duration,
        checked_ttl: Duration,
        lookup: Lookup,
    ) -> Resolver {
        Resolver {
            pins: Arc::new(pins),
            cache: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(ttl)
                .build(),
            checked: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(checked_ttl * 2)
                .build(),
            checked_ttl,
            lookup,
        }
    }

    /// What a destination check of `host` judges: the answer the last check accepted
    /// while it is younger than [`CHECKED_TTL`], the name resolved again otherwise.
    pub async fn resolve_for_check(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        match self.checked.get(host) {
            Some((ips, at)) if at.elapsed() < self.checked_ttl => {
                Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
            }
            _ => self.resolve_unchecked(host, port).await,
        }
    }

    /// Connections to `host` use `addrs`, the answer a destination check just accepted
    /// (from [`Resolver::resolve_for_check`]). An answer already remembered keeps its age,
    /// so checks resolve the name again once it is [`CHECKED_TTL`] old.
    pub fn remember_checked(&self, host: &str, addrs: &[SocketAddr]) {
        if self.pins.contains_key(host) || addrs.is_empty() {
            return;
        }
        let ips: Vec<IpAddr> = addrs.iter().map(|a| a.ip()).collect();
        let kept = self
            .checked
            .get(host)
            .is_some_and(|(known, at)| *known == ips && at.elapsed() < self.checked_ttl);
        if !kept {
            self.checked
                .insert(host.to_owned(), (Arc::new(ips), std::time::Instant::now()));
        }
    }

    /// Whether `host` is pinned in `[upstream.resolve]` (an operator's explicit decision).
    pub fn is_pinned(&self, host: &str) -> bool {
        self.pins.contains_key(host)
    }

    /// The addresses a connection to `host` uses: the answer a destination check accepted
    /// (of any age the cache keeps), otherwise as [`Resolver::resolve_unchecked`].
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Some((ips, _)) = self.checked.get(host) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        self.resolve_unchecked(host, port).await
    }

    /// Pins, IP literals, then the system resolver through the `dns_ttl` cache.
    async fn resolve_unchecked(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Some(ips) = self.pins.get(host) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let ips = self
            .cache
            .try_get_with(host.to_owned(), async {
                let ips = (self.lookup)(host.to_owned()).await?;
                if ips.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{host} has no addresses"),
                    ));
                }
                Ok(Arc::new(ips))
            })
            .await
            .map_err(|e: Arc<io::Error>| io::Error::new(e.kind(), e.to_string()))?;
        Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
    }
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let this = self.clone();
        // HttpConnector fills in the port after resolution.
        Box::pin(async move { this.resolve(name.as_str(), 0).await.map(Vec::into_iter) })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[tokio::test]
    async fn pins_win_over_dns_and_keep_the_port() {
        let mut pins = BTreeMap::new();
        pins.insert("quay.io".to_string(), vec!["127.0.0.7".parse().unwrap()]);
        let r = Resolver::new(pins, Duration::from_secs(60));
        assert_eq!(
            r.resolve("quay.io", 5443).await.unwrap(),
            vec!["127.0.0.7:5443".parse().unwrap()]
        );
        assert_eq!(
            r.resolve("127.0.0.9", 1).await.unwrap(),
            vec!["127.0.0.9:1".parse().unwrap()]
        );
    }

    /// A name whose DNS answers `first` once, then `then` for ever; answers kept `dns_ttl`,
    /// checked ones judged for `checked_ttl`.
    pub(crate) fn answers(
        first: &str,
        then: &str,
        dns_ttl: Duration,
        checked_ttl: Duration,
    ) -> Resolver {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (first, then): (IpAddr, IpAddr) = (first.parse().unwrap(), then.parse().unwrap());
        Resolver::with_lookup(
            BTreeMap::new(),
            dns_ttl,
            checked_ttl,
            Arc::new(move |_host: String| {
                let once = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                Box::pin(async move { Ok(vec![if once { first } else { then }]) })
            }),
        )
    }

    /// A rebinding attacker: a public address once, then loopback.
    pub(crate) fn rebinding(dns_ttl: Duration) -> Resolver {
        answers("93.184.216.34", "127.0.0.1", dns_ttl, CHECKED_TTL)
    }

    #[tokio::test]
    async fn a_checked_answer_outlives_the_dns_cache() {
        let public: Vec<SocketAddr> = vec!["93.184.216.34:443".parse().unwrap()];
        // Without a check the second lookup, once the answer has expired, rebinds.
        let r = rebinding(Duration::from_millis(1));
        assert_eq!(r.resolve("evil.example", 443).await.unwrap(), public);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            r.resolve("evil.example", 443).await.unwrap(),
            vec!["127.0.0.1:443".parse::<SocketAddr>().unwrap()]
        );
        // With one, the connection gets what the check accepted.
        let r = rebinding(Duration::from_millis(1));
        let checked = r.resolve("evil.example", 443).await.unwrap();
        r.remember_checked("evil.example", &checked);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(r.resolve("evil.example", 443).await.unwrap(), public);
    }
}
