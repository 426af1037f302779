//! Stowage's own connections to registries and storage hosts.
//!
//! One pooled hyper client over rustls (HTTP/2 where offered), trusting the public web PKI
//! plus `[upstream] extra_ca`. Host names pinned in `[upstream.resolve]` never reach DNS.
//! Every wait is bounded: connect, response headers, and (in the callers) body idleness.
//! Redirects are followed here only when asked for (blob and manifest fetches), with a hop
//! limit and `Authorization` dropped whenever the origin changes.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST, LOCATION};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;

use crate::config::UpstreamConfig;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long one address is tried alone before the next joins (IPv6/IPv4 fallback).
const HAPPY_EYEBALLS: Duration = Duration::from_millis(300);
/// Request bodies sent upstream: empty for fetches, the client's own body when forwarding.
pub type UpBody = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {host}: {message}")]
    Connect { host: String, message: String },
    #[error("{host} sent no response within {after:?}")]
    Timeout { host: String, after: Duration },
    #[error("more than {0} redirects")]
    TooManyRedirects(u32),
    #[error("redirect with an unusable Location: {0}")]
    BadRedirect(String),
    #[error("bad upstream address {0}")]
    BadUri(String),
    #[error("reading the upstream body: {0}")]
    Body(String),
    #[error("upstream body stalled for {0:?}")]
    BodyStalled(Duration),
}

impl UpstreamError {
    fn from_client(host: &str, e: hyper_util::client::legacy::Error) -> UpstreamError {
        // Walk the source chain for the innermost message: "connection refused", a TLS alert, ...
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message = s.to_string();
            source = s.source();
        }
        UpstreamError::Connect {
            host: host.to_owned(),
            message,
        }
    }
}

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

pub struct Upstream {
    client: Client<hyper_rustls::HttpsConnector<Connector>, UpBody>,
    proxy: Option<Arc<Matcher>>,
    resolver: Resolver,
    connect_timeout: Duration,
    response_timeout: Duration,
    idle_timeout: Duration,
    max_redirects: u32,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// A response together with the URI that finally produced it (after redirects).
pub struct Fetched {
    pub response: Response<Incoming>,
    pub uri: Uri,
}

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Upstream, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for path in &config.extra_ca {
            let pem = std::fs::read(path)
                .map_err(|e| format!("upstream.extra_ca {}: {e}", path.display()))?;
            let mut n = 0;
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|e| format!("upstream.extra_ca {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("upstream.extra_ca {}: {e}", path.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!(
                    "upstream.extra_ca {}: no PEM certificate in the file",
                    path.display()
                ));
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let pins = config
            .resolve
            .iter()
            .map(|(h, l)| (h.clone(), l.0.clone()))
            .collect();
        let resolver = Resolver::new(pins, config.dns_ttl.0);
        let mut http = HttpConnector::new_with_resolver(resolver.clone());
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout.0));
        http.set_happy_eyeballs_timeout(Some(HAPPY_EYEBALLS));
        let matcher = proxy_matcher(config).map(Arc::new);
        if let Some(m) = &matcher {
            tracing::info!(proxy = ?m, "upstream connections go through a proxy");
        }
        let connector = Connector {
            http,
            proxy: matcher.clone(),
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .http2_initial_stream_window_size(Some(4 << 20))
            .http2_initial_connection_window_size(Some(8 << 20))
            .build(https);
        Ok(Upstream {
            client,
            proxy: matcher,
            resolver,
            connect_timeout: config.connect_timeout.0,
            response_timeout: config.response_timeout.0,
            idle_timeout: config.idle_timeout.0,
            max_redirects: config.max_redirects,
            metrics,
        })
    }

    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// How long an upstream body may send nothing before it is abandoned.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Opens a TCP connection for a blind tunnel, through the upstream proxy when one
    /// applies, else trying each resolved address in turn.
    pub async fn connect_tcp(&self, host: &str, port: u16) -> Result<TcpStream, UpstreamError> {
        let err = |message: String| UpstreamError::Connect {
            host: host.to_owned(),
            message,
        };
        let dst: Uri = format!(
            "https://{}:{port}",
            if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_owned()
            }
        )
        .parse()
        .map_err(|_| err("not a valid host".into()))?;
        if let Some(intercept) = self.proxy.as_ref().and_then(|m| m.intercept(&dst)) {
            let proxy_host = intercept.uri().host().unwrap_or_default().to_owned();
            let proxy_port = intercept.uri().port_u16().unwrap_or(80);
            let mut s = Box::pin(self.connect_direct(&proxy_host, proxy_port)).await?;
            let auth = intercept.basic_auth().cloned();
            connect_via(&mut s, host, port, auth.as_ref())
                .await
                .map_err(|e| err(format!("through proxy {proxy_host}: {e}")))?;
            return Ok(s);
        }
        self.connect_direct(host, port).await
    }

    async fn connect_direct(&self, host: &str, port: u16) -> Result<TcpStream, UpstreamError> {
        use futures_util::StreamExt;
        let err = |message: String| UpstreamError::Connect {
            host: host.to_owned(),
            message,
        };
        let addrs = self
            .resolver
            .resolve(host, port)
            .await
            .map_err(|e| err(e.to_string()))?;
        // Happy eyeballs, as the registry client does: each address gets a head start, then
        // the next is tried alongside (at once when one fails); the first connection wins.
        // An address that swallows SYNs (an unreachable AAAA) costs the head start, not the
        // whole connect timeout.
        let timeout = self.connect_timeout;
        let mut pending = addrs.into_iter();
        let mut attempts = futures_util::stream::FuturesUnordered::new();
        let mut last = String::from("no address");
        loop {
            match pending.next() {
                Some(addr) => attempts.push(async move {
                    (
                        addr,
                        tokio::time::timeout(timeout, TcpStream::connect(addr)).await,
                    )
                }),
                None if attempts.is_empty() => return Err(err(last)),
                None => {}
            }
            let head_start = tokio::time::sleep(HAPPY_EYEBALLS);
            tokio::pin!(head_start);
            tokio::select! {
                Some((addr, result)) = attempts.next() => match result {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        return Ok(s);
                    }
                    Ok(Err(e)) => last = format!("{addr}: {e}"),
                    Err(_) => last = format!("{addr}: connect timed out after {timeout:?}"),
                },
                _ = &mut head_start, if pending.len() > 0 => {}
                else => {}
            }
        }
    }

    /// Sends one request; no redirects followed.
    pub async fn send(&self, req: Request<UpBody>) -> Result<Response<Incoming>, UpstreamError> {
        let host = req.uri().host().unwrap_or_default().to_owned();
        let origin = crate::oci::Registry::of_uri(req.uri());
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => {
                if let (Some(m), Some(origin)) = (&self.metrics, &origin) {
                    m.observe_ratelimit(origin, resp.headers());
                }
                Ok(resp)
            }
            Ok(Err(e)) => Err(UpstreamError::from_client(&host, e)),
            Err(_) => Err(UpstreamError::Timeout {
                host,
                after: self.response_timeout,
            }),
        }
    }

    /// A bodiless `GET`/`HEAD` that follows redirects itself. `Authorization` goes only to
    /// the origin it was meant for; a hop to another scheme, host or port drops it.
    pub async fn fetch(
        &self,
        method: Method,
        uri: Uri,
        mut headers: HeaderMap,
    ) -> Result<Fetched, UpstreamError> {
        headers.remove(HOST);
        let mut uri = uri;
        let mut method = method;
        for _ in 0..=self.max_redirects {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .body(empty())
                .expect("valid parts");
            *req.headers_mut() = headers.clone();
            let resp = self.send(req).await?;
            let status = resp.status();
            if !is_redirect(status) {
                return Ok(Fetched {
                    response: resp,
                    uri,
                });
            }
            let Some(location) = resp.headers().get(LOCATION).and_then(|l| l.to_str().ok()) else {
                return Ok(Fetched {
                    response: resp,
                    uri,
                });
            };
            let next = resolve_location(&uri, location)?;
            if origin(&next) != origin(&uri) {
                headers.remove(AUTHORIZATION);
            }
            if status == StatusCode::SEE_OTHER && method != Method::HEAD {
                method = Method::GET;
            }
            tracing::debug!(from = %redact(&uri), to = %redact(&next), status = status.as_u16(), "following redirect");
            uri = next;
        }
        Err(UpstreamError::TooManyRedirects(self.max_redirects))
    }
}

/// The upstream proxy rules: `[upstream] proxy`/`no_proxy`, or the environment.
fn proxy_matcher(config: &UpstreamConfig) -> Option<Matcher> {
    let m = match config.proxy.as_deref() {
        Some("") => return None,
        Some(p) => Matcher::builder()
            .http(p)
            .https(p)
            .no(config.no_proxy.as_str())
            .build(),
        None => Matcher::from_env(),
    };
    // A matcher with nothing configured intercepts nothing.
    let probe: Uri = "https://registry-1.docker.io".parse().expect("valid");
    let probe_http: Uri = "http://registry-1.docker.io".parse().expect("valid");
    (m.intercept(&probe).is_some() || m.intercept(&probe_http).is_some()).then_some(m)
}

/// Sends `CONNECT host:port` on `s` and reads the proxy's answer.
async fn connect_via(
    s: &mut TcpStream,
    host: &str,
    port: u16,
    auth: Option<&http::HeaderValue>,
) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = auth {
        req.push_str("Proxy-Authorization: ");
        req.push_str(a.to_str().unwrap_or_default());
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    // Byte by byte so nothing after the header block is consumed.
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 8192 || s.read(&mut byte).await? == 0 {
            return Err(io::Error::other(
                "proxy closed the connection during CONNECT",
            ));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(io::Error::other(format!(
            "proxy answered CONNECT with {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(())
}

/// TCP to the upstream, or through the upstream proxy with `CONNECT`.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector<Resolver>,
    proxy: Option<Arc<Matcher>>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let intercept = self.proxy.as_ref().and_then(|m| m.intercept(&dst));
        Box::pin(async move {
            match intercept {
                None => Ok(http.call(dst).await?),
                Some(i) => {
                    let io = http.call(i.uri().clone()).await?;
                    let mut tcp = io.into_inner();
                    let host = dst
                        .host()
                        .ok_or("no host")?
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned();
                    let port = dst
                        .port_u16()
                        .unwrap_or(if dst.scheme_str() == Some("http") {
                            80
                        } else {
                            443
                        });
                    connect_via(&mut tcp, &host, port, i.basic_auth()).await?;
                    Ok(TokioIo::new(tcp))
                }
            }
        })
    }
}

pub fn empty() -> UpBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

fn origin(u: &Uri) -> (Option<&str>, Option<&str>, Option<u16>) {
    (u.scheme_str(), u.host(), u.port_u16())
}

/// Resolves an absolute, scheme-relative or path-relative `Location` against `base`.
pub fn resolve_location(base: &Uri, location: &str) -> Result<Uri, UpstreamError> {
    let bad = || UpstreamError::BadRedirect(location.chars().take(200).collect());
    if location.starts_with("https://") || location.starts_with("http://") {
        let u: Uri = location.parse().map_err(|_| bad())?;
        if u.host().is_none() {
            return Err(bad());
        }
        return Ok(u);
    }
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().ok_or_else(bad)?.as_str();
    let joined = if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let dir = base.path().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        format!("{scheme}://{authority}{dir}/{location}")
    };
    let u: Uri = joined.parse().map_err(|_| bad())?;
    if u.host().is_none() {
        return Err(bad());
    }
    Ok(u)
}

/// A URI for logs: scheme, host and path only. Presigned storage URLs carry credentials in
/// their query string, so queries are never logged.
pub fn redact(u: &Uri) -> String {
    format!(
        "{}://{}{}",
        u.scheme_str().unwrap_or("https"),
        u.authority().map(|a| a.as_str()).unwrap_or(""),
        u.path()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_resolve_against_the_base() {
        let base: Uri = "https://quay.io:5443/v2/a/blobs/sha256:00?x=1"
            .parse()
            .unwrap();
        let r = |l: &str| resolve_location(&base, l).unwrap().to_string();
        assert_eq!(r("https://s3.test/b?sig=1"), "https://s3.test/b?sig=1");
        assert_eq!(r("/storage/x"), "https://quay.io:5443/storage/x");
        assert_eq!(r("//cdn.test/x"), "https://cdn.test/x");
        assert_eq!(r("other"), "https://quay.io:5443/v2/a/blobs/other");
        assert!(resolve_location(&base, "https://").is_err());
    }

    #[test]
    fn redaction_drops_queries() {
        let u: Uri = "https://s3.test/bucket/key?X-Amz-Signature=secret"
            .parse()
            .unwrap();
        assert_eq!(redact(&u), "https://s3.test/bucket/key");
    }

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
