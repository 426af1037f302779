//! Name resolution for upstream connections: `[upstream.resolve]` pins first (tests,
//! split-horizon DNS), the system resolver otherwise, answers reused for `dns_ttl`.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::dns::Name;

/// Resolves names through `[upstream.resolve]` pins first, the system resolver otherwise
/// (answers reused for `dns_ttl`).
#[derive(Clone)]
pub struct Resolver {
    pins: Arc<BTreeMap<String, Vec<IpAddr>>>,
    cache: moka::future::Cache<String, Arc<Vec<IpAddr>>>,
}

impl Resolver {
    pub fn new(pins: BTreeMap<String, Vec<IpAddr>>, ttl: Duration) -> Resolver {
        Resolver {
            pins: Arc::new(pins),
            cache: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Whether `host` is pinned in `[upstream.resolve]` (an operator's explicit decision).
    pub fn is_pinned(&self, host: &str) -> bool {
        self.pins.contains_key(host)
    }

    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
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
                let ips: Vec<IpAddr> = tokio::net::lookup_host((host, 0))
                    .await?
                    .map(|a| a.ip())
                    .collect();
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
mod tests {
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
}
