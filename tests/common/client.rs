//! The test's registry client: `CONNECT` through Stowage, TLS trusting only the CA it is
//! given, then HTTP/1.1 or h2 as ALPN decides. `direct` skips the proxy (for harness
//! self-checks against the fakes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{ACCEPT, AUTHORIZATION, HOST, USER_AGENT, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::registry::{DOCKER_MANIFEST, OCI_MANIFEST};
use super::tls::{install_provider, provider};
use super::{percent_encode, sha256_digest, TEST_USER_AGENT};

/// Bound on any single request (headers and body) so a hang fails the test instead.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http11,
    /// Offer both, h2 first (curl's choice).
    Both,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Http11 => vec![b"http/1.1".to_vec()],
            Alpn::Both => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Route {
    Proxy(SocketAddr),
    /// Straight to 127.0.0.1:<port>, as if every host resolved there.
    Direct,
}

/// Opens tunnels to registries, through Stowage or directly.
#[derive(Clone)]
pub struct ProxyClient {
    route: Route,
    roots: Arc<rustls::RootCertStore>,
}

fn roots_from_pem(pem: &str) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.expect("PEM certificate")).expect("add root");
        n += 1;
    }
    assert!(n > 0, "no certificate in the CA PEM");
    roots
}

impl ProxyClient {
    /// Through Stowage at `proxy`, trusting only `ca_pem` (Stowage's CA).
    pub fn via_proxy(proxy: SocketAddr, ca_pem: &str) -> ProxyClient {
        install_provider();
        ProxyClient {
            route: Route::Proxy(proxy),
            roots: Arc::new(roots_from_pem(ca_pem)),
        }
    }

    /// Straight to the fakes on 127.0.0.1, trusting only `ca_pem`.
    pub fn direct(ca_pem: &str) -> ProxyClient {
        install_provider();
        ProxyClient {
            route: Route::Direct,
            roots: Arc::new(roots_from_pem(ca_pem)),
        }
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        match self.route {
            Route::Proxy(a) => a,
            Route::Direct => panic!("a direct client has no proxy"),
        }
    }

    /// Sends `CONNECT <authority>` and reads the proxy's response head. On 200 the stream
    /// is the tunnel.
    pub async fn connect_raw(&self, authority: &str) -> Result<(TcpStream, StatusCode), String> {
        let mut tcp = TcpStream::connect(self.proxy_addr())
            .await
            .map_err(|e| format!("connect to proxy: {e}"))?;
        tcp.set_nodelay(true).ok();
        let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {TEST_USER_AGENT}\r\n\r\n");
        tcp.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write CONNECT: {e}"))?;
        // Byte by byte: nothing after the head may be consumed, it belongs to the tunnel.
        let mut head = Vec::new();
        let read_head = async {
            loop {
                let mut b = [0u8; 1];
                let n = tcp
                    .read(&mut b)
                    .await
                    .map_err(|e| format!("read CONNECT response: {e}"))?;
                if n == 0 {
                    return Err(format!(
                        "proxy closed during CONNECT response: {:?}",
                        String::from_utf8_lossy(&head)
                    ));
                }
                head.push(b[0]);
                if head.ends_with(b"\r\n\r\n") {
                    return Ok(());
                }
                if head.len() > 16 * 1024 {
                    return Err("CONNECT response head too long".to_owned());
                }
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, read_head)
            .await
            .map_err(|_| "CONNECT response timed out".to_owned())??;
        let text = String::from_utf8_lossy(&head);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad CONNECT response: {text:?}"))?;
        Ok((
            tcp,
            StatusCode::from_u16(status).map_err(|e| e.to_string())?,
        ))
    }

    /// A TCP stream to `host:port`: a CONNECT tunnel through the proxy, or a direct socket.
    async fn tcp_to(&self, host: &str, port: u16) -> Result<TcpStream, String> {
        match self.route {
            Route::Proxy(_) => {
                let (tcp, status) = self.connect_raw(&format!("{host}:{port}")).await?;
                if status != StatusCode::OK {
                    return Err(format!("CONNECT {host}:{port} answered {status}"));
                }
                Ok(tcp)
            }
            Route::Direct => TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| format!("connect: {e}")),
        }
    }

    /// Only the TLS handshake: fails unless the server's chain validates for `host`
    /// against this client's roots.
    pub async fn tls(
        &self,
        host: &str,
        port: u16,
        alpn: Alpn,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let tcp = self.tcp_to(host, port).await?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.protocols();
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("server name {host}: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        tokio::time::timeout(REQUEST_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_owned())?
            .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))
    }

    /// A TLS tunnel to `host:port` with an HTTP connection on it.
    pub async fn tunnel(&self, host: &str, port: u16, alpn: Alpn) -> Result<Tunnel, String> {
        let tls = self.tls(host, port, alpn).await?;
        let (_, conn) = tls.get_ref();
        let negotiated = conn.alpn_protocol().map(|p| p.to_vec());
        let peer_certs: Vec<CertificateDer<'static>> = conn
            .peer_certificates()
            .unwrap_or(&[])
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        let io = TokioIo::new(tls);
        let sender = if negotiated.as_deref() == Some(b"h2") {
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Sender::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("http/1.1 handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Sender::H1(tokio::sync::Mutex::new(send))
        };
        Ok(Tunnel {
            sender,
            alpn: negotiated,
            peer_certs,
            host: host.to_owned(),
            port,
        })
    }

    /// A plain HTTP/1.1 request to the proxy's own endpoints.
    pub async fn proxy_get(&self, path: &str) -> Resp {
        self.proxy_get_with(path, &[]).await
    }

    /// [`Self::proxy_get`] with extra request headers.
    pub async fn proxy_get_with(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        let tcp = TcpStream::connect(self.proxy_addr())
            .await
            .expect("connect to proxy");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("http/1.1 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .uri(path)
            .header(HOST, self.proxy_addr().to_string())
            .header(USER_AGENT, TEST_USER_AGENT);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::<Bytes>::new()).unwrap();
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, send.send_request(req))
            .await
            .expect("timeout")
            .expect("proxy request");
        let r = read_response(resp).await;
        r.assert_complete();
        r
    }
}

enum Sender {
    H1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// One TLS connection inside a tunnel (or direct), with its negotiated protocol and the
/// certificate chain the server presented.
pub struct Tunnel {
    sender: Sender,
    pub alpn: Option<Vec<u8>>,
    pub peer_certs: Vec<CertificateDer<'static>>,
    pub host: String,
    pub port: u16,
}

impl Tunnel {
    pub fn is_h2(&self) -> bool {
        matches!(self.sender, Sender::H2(_))
    }

    /// Sends a request and returns as soon as the response head is in.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response<Incoming>, String> {
        let authority = format!("{}:{}", self.host, self.port);
        let mut b = Request::builder().method(method);
        b = match self.sender {
            Sender::H2(_) => b
                .uri(format!("https://{authority}{path}"))
                .version(Version::HTTP_2),
            Sender::H1(_) => b.uri(path).header(HOST, &authority),
        };
        b = b.header(USER_AGENT, TEST_USER_AGENT);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let fut = async {
            match &self.sender {
                Sender::H2(s) => {
                    let mut s = s.clone();
                    s.ready().await.map_err(|e| format!("h2 not ready: {e}"))?;
                    s.send_request(req)
                        .await
                        .map_err(|e| format!("h2 request: {e}"))
                }
                Sender::H1(s) => {
                    let mut s = s.lock().await;
                    s.ready()
                        .await
                        .map_err(|e| format!("http/1.1 not ready: {e}"))?;
                    s.send_request(req)
                        .await
                        .map_err(|e| format!("http/1.1 request: {e}"))
                }
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| "request timed out waiting for the response head".to_owned())?
    }

    /// The whole response; a body that fails or stops early is reported in
    /// [`Resp::body_error`], not a panic.
    pub async fn request_raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Resp, String> {
        let resp = self.send(method, path, headers).await?;
        Ok(read_response(resp).await)
    }

    /// The whole response; panics unless the body arrived complete.
    pub async fn request(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Resp {
        let r = self
            .request_raw(method.clone(), path, headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        r.assert_complete();
        r
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.request(Method::GET, path, headers).await
    }

    pub async fn head(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.request(Method::HEAD, path, headers).await
    }
}

/// A response read to its end (or to its failure).
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// The bytes received, complete or not.
    pub body: Bytes,
    /// Set when the body ended in an error (reset stream, connection closed early, timeout).
    pub body_error: Option<String>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("<no X-Cache>")
    }

    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn assert_complete(&self) {
        if let Some(e) = &self.body_error {
            panic!(
                "response body failed after {} bytes: {e} (status {}, headers {:?})",
                self.body.len(),
                self.status,
                self.headers
            );
        }
    }
}

pub async fn read_response(resp: Response<Incoming>) -> Resp {
    let (parts, mut body) = resp.into_parts();
    let mut buf = BytesMut::new();
    let mut error = None;
    let read = async {
        loop {
            match body.frame().await {
                None => return None,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    return Some(format!(
                        "{e} ({:?})",
                        std::error::Error::source(&e).map(|s| s.to_string())
                    ))
                }
            }
        }
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Ok(e) => error = error.or(e),
        Err(_) => error = Some(format!("body timed out after {REQUEST_TIMEOUT:?}")),
    }
    Resp {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: buf.freeze(),
        body_error: error,
    }
}

/// An authenticated conversation with one registry, as a container runtime has it:
/// `/v2/` → 401 → token for the repository → requests with `Authorization: Bearer`.
pub struct Session {
    pub tunnel: Tunnel,
    pub token: String,
    pub repo: String,
}

impl Session {
    /// Does the token dance for pulling `repo` from `host:port`. The token service named
    /// by the challenge's realm is reached through its own tunnel when it is another host.
    pub async fn login(
        client: &ProxyClient,
        host: &str,
        port: u16,
        repo: &str,
        alpn: Alpn,
    ) -> Session {
        let tunnel = client
            .tunnel(host, port, alpn)
            .await
            .unwrap_or_else(|e| panic!("tunnel to {host}:{port}: {e}"));
        let token = Self::token(client, &tunnel, repo, alpn).await;
        Session {
            tunnel,
            token,
            repo: repo.to_owned(),
        }
    }

    /// Like `login`, on an existing tunnel.
    pub async fn on(client: &ProxyClient, tunnel: Tunnel, repo: &str, alpn: Alpn) -> Session {
        let token = Self::token(client, &tunnel, repo, alpn).await;
        Session {
            tunnel,
            token,
            repo: repo.to_owned(),
        }
    }

    async fn token(client: &ProxyClient, tunnel: &Tunnel, repo: &str, alpn: Alpn) -> String {
        let ping = tunnel.get("/v2/", &[]).await;
        assert_eq!(
            ping.status,
            StatusCode::UNAUTHORIZED,
            "GET /v2/ without a token: {:?}",
            ping.text()
        );
        let challenge = ping
            .header(WWW_AUTHENTICATE.as_str())
            .expect("401 without WWW-Authenticate")
            .to_owned();
        let param = |name: &str| -> Option<String> {
            let key = format!("{name}=\"");
            let start = challenge.find(&key)? + key.len();
            let end = challenge[start..].find('"')? + start;
            Some(challenge[start..end].to_owned())
        };
        let realm: http::Uri = param("realm")
            .expect("realm in challenge")
            .parse()
            .expect("realm is a URL");
        let service = param("service").unwrap_or_default();
        let (rhost, rport) = (
            realm.host().expect("realm host").to_owned(),
            realm.port_u16().unwrap_or(443),
        );
        let path = format!(
            "{}?service={}&scope={}",
            realm.path(),
            percent_encode(&service),
            percent_encode(&format!("repository:{repo}:pull"))
        );
        let resp = if rhost == tunnel.host && rport == tunnel.port {
            tunnel.get(&path, &[]).await
        } else {
            let auth = client
                .tunnel(&rhost, rport, alpn)
                .await
                .unwrap_or_else(|e| panic!("tunnel to token service {rhost}:{rport}: {e}"));
            auth.get(&path, &[]).await
        };
        assert_eq!(
            resp.status,
            StatusCode::OK,
            "token request: {}",
            resp.text()
        );
        let v = resp.json();
        v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .expect("token in response")
            .to_owned()
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    pub async fn get(&self, path: &str, extra: &[(&str, &str)]) -> Resp {
        self.request(Method::GET, path, extra).await
    }

    pub async fn request(&self, method: Method, path: &str, extra: &[(&str, &str)]) -> Resp {
        let auth = self.auth();
        let mut headers: Vec<(&str, &str)> = vec![(AUTHORIZATION.as_str(), auth.as_str())];
        headers.extend_from_slice(extra);
        self.tunnel.request(method, path, &headers).await
    }

    pub async fn request_raw(
        &self,
        method: Method,
        path: &str,
        extra: &[(&str, &str)],
    ) -> Result<Resp, String> {
        let auth = self.auth();
        let mut headers: Vec<(&str, &str)> = vec![(AUTHORIZATION.as_str(), auth.as_str())];
        headers.extend_from_slice(extra);
        self.tunnel.request_raw(method, path, &headers).await
    }

    pub fn blob_path(&self, digest: &str) -> String {
        format!("/v2/{}/blobs/{digest}", self.repo)
    }

    pub fn manifest_path(&self, reference: &str) -> String {
        format!("/v2/{}/manifests/{reference}", self.repo)
    }

    pub async fn blob(&self, digest: &str) -> Resp {
        self.get(&self.blob_path(digest), &[]).await
    }

    pub async fn manifest(&self, reference: &str) -> Resp {
        let accept = format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}");
        self.get(
            &self.manifest_path(reference),
            &[(ACCEPT.as_str(), accept.as_str())],
        )
        .await
    }
}

/// What one pull fetched, in order: manifest, config, layers.
pub struct Pulled {
    pub manifest: Resp,
    pub manifest_digest: String,
    /// (digest, response) for the config blob and each layer.
    pub blobs: Vec<(String, Resp)>,
}

impl Pulled {
    pub fn blob_x_cache(&self) -> Vec<String> {
        self.blobs
            .iter()
            .map(|(_, r)| r.x_cache().to_owned())
            .collect()
    }
}

/// Pulls `repo:tag` like a container runtime: token dance, manifest by tag, config, layers.
/// Panics unless every status is 200 and every blob hashes to its digest.
pub async fn pull(
    client: &ProxyClient,
    host: &str,
    port: u16,
    repo: &str,
    tag: &str,
    alpn: Alpn,
) -> Pulled {
    let s = Session::login(client, host, port, repo, alpn).await;
    let manifest = s.manifest(tag).await;
    assert_eq!(
        manifest.status,
        StatusCode::OK,
        "manifest {repo}:{tag}: {}",
        manifest.text()
    );
    let manifest_digest = sha256_digest(&manifest.body);
    if let Some(d) = manifest.header("docker-content-digest") {
        assert_eq!(
            d, manifest_digest,
            "Docker-Content-Digest of {repo}:{tag} does not match its body"
        );
    }
    let m = manifest.json();
    let mut digests = vec![m["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_owned()];
    let mut sizes = vec![m["config"]["size"].as_u64().expect("config size")];
    for l in m["layers"].as_array().expect("layers") {
        digests.push(l["digest"].as_str().expect("layer digest").to_owned());
        sizes.push(l["size"].as_u64().expect("layer size"));
    }
    let mut blobs = Vec::new();
    for (d, size) in digests.into_iter().zip(sizes) {
        let r = s.blob(&d).await;
        assert_eq!(r.status, StatusCode::OK, "blob {d}: {}", r.text());
        assert_eq!(r.body.len() as u64, size, "blob {d} size");
        assert_eq!(
            sha256_digest(&r.body),
            d,
            "blob body does not hash to its digest"
        );
        blobs.push((d, r));
    }
    Pulled {
        manifest,
        manifest_digest,
        blobs,
    }
}
