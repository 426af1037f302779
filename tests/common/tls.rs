//! The test's own CA (standing in for the public web PKI that real registries use) and a
//! small TLS + HTTP/1.1 + h2 server that the fakes run on.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::FAKE_HOSTS;

pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A CA made in the test. Its PEM is written to a temp file for `[upstream] extra_ca`.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pem_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        install_provider();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Stowage test upstream CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let pem_path = dir.path().join("test-ca.pem");
        std::fs::write(&pem_path, cert.pem()).expect("write CA PEM");
        TestCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            pem_path,
            _dir: dir,
        }
    }

    /// The PEM file to list in `[upstream] extra_ca`.
    pub fn pem_path(&self) -> &Path {
        &self.pem_path
    }

    /// A leaf for `names` (DNS names or IP literals) with its own key, and the chain.
    pub fn issue(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.is_ca = IsCa::ExplicitNoCa;
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let chain = vec![cert.der().clone(), self.cert_der.clone()];
        (
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// A server config for `names`, offering h2 and http/1.1.
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let (chain, key) = self.issue(names);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server cert");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A server config valid for every fake host name (and localhost).
    pub fn fake_hosts_config(&self) -> Arc<rustls::ServerConfig> {
        let mut names: Vec<&str> = FAKE_HOSTS.to_vec();
        names.push("localhost");
        self.server_config(&names)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> HandlerFuture + Send + Sync>;

/// A TLS server on 127.0.0.1:0 serving HTTP/1.1 and h2 with `handler`. Dropping it stops
/// the listener and every connection.
pub struct TlsServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    alpns: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsServer {
    /// Binds first, so `make_handler` can learn the port (for redirect and realm URLs).
    pub async fn start(
        config: Arc<rustls::ServerConfig>,
        make_handler: impl FnOnce(SocketAddr) -> Handler,
    ) -> TlsServer {
        install_provider();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake server");
        let addr = listener.local_addr().expect("local addr");
        let handler = make_handler(addr);
        let connections = Arc::new(AtomicUsize::new(0));
        let alpns = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (conns_c, alpns_c) = (connections.clone(), alpns.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        conns_c.fetch_add(1, Ordering::SeqCst);
                        let (acceptor, handler, alpns) = (acceptor.clone(), handler.clone(), alpns_c.clone());
                        conns.spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            alpns.lock().unwrap().push(tls.get_ref().1.alpn_protocol().map(|p| p.to_vec()));
                            let svc = service_fn(move |req| {
                                let handler = handler.clone();
                                async move { Ok::<_, Infallible>(handler(req).await) }
                            });
                            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                            // More than hyper's 200 h2 streams: the load tool's hundreds of
                            // concurrent fills share one upstream connection.
                            builder.http2().max_concurrent_streams(1024);
                            let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        TlsServer {
            addr,
            connections,
            alpns,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The ALPN protocol negotiated on each TLS connection, in order.
    pub fn alpns(&self) -> Vec<Option<Vec<u8>>> {
        self.alpns.lock().unwrap().clone()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
