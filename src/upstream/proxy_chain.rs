//! Chaining through a corporate proxy (`[upstream] proxy`, or `HTTPS_PROXY` in Stowage's
//! environment): `CONNECT` through it for registry connections and blind tunnels, with
//! `no_proxy` exceptions; and the happy-eyeballs TCP connect for blind tunnels.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::client::{Upstream, UpstreamError, HAPPY_EYEBALLS};
use super::resolver::Resolver;
use crate::http_util::BoxError;
use crate::settings::UpstreamConfig;

impl Upstream {
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
}

/// The upstream proxy rules: `[upstream] proxy`/`no_proxy`, or the environment.
pub(super) fn proxy_matcher(config: &UpstreamConfig) -> Option<Matcher> {
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
    pub(super) http: HttpConnector<Resolver>,
    pub(super) proxy: Option<Arc<Matcher>>,
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
