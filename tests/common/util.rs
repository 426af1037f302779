//! Small helpers several test files share: bounded waits, Prometheus samples, an echo
//! server for tunnels, certificate inspection, and file walks.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::client::ProxyClient;
use super::pseudo_random;
use super::tls::provider;

/// No single step of a test may take longer than this; past it the step is a hang.
pub const BOUND: Duration = Duration::from_secs(20);

/// `f`, or a panic naming `what` when it takes longer than [`BOUND`].
pub async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {BOUND:?} (a hang)"))
}

/// The sum of every sample of `name` whose labels include `labels` (0 when absent), from
/// Prometheus text exposition.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n == name
            && labels
                .iter()
                .all(|(k, v)| l.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        {
            sum += value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad sample {line:?}"));
        }
    }
    sum
}

/// A TCP server on 127.0.0.1 that runs `serve` on every connection and counts them.
pub async fn counting_server<F, Fut>(
    serve: F,
) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s));
        }
    });
    (addr, accepted, task)
}

/// An echo server on 127.0.0.1: returns every byte, closes its side after the client's
/// EOF, counts connections.
pub async fn echo_server() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let (addr, accepted, task) = counting_server(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await;
    (addr.port(), accepted, task)
}

/// A blind tunnel through Stowage to `authority` (an [`echo_server`]) carries `len`
/// bytes both ways unchanged.
pub async fn echo_through(client: &ProxyClient, authority: &str, seed: u64, len: usize) {
    let (mut tcp, status) = client.connect_raw(authority).await.unwrap();
    assert_eq!(status, StatusCode::OK, "CONNECT {authority}");
    let sent = pseudo_random(len, seed);
    let (mut r, mut w) = tcp.split();
    let write = async {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(write, read) })
            .await
            .expect("tunnel echo timed out");
    assert_eq!(got.len(), sent.len(), "CONNECT {authority}: bytes lost");
    assert!(
        got == sent,
        "CONNECT {authority}: bytes changed in the tunnel"
    );
}

/// The subject alternative names of a DER certificate (DNS names as text, others debug-
/// printed), and whether it is a CA.
pub fn cert_names(der: &[u8]) -> (Vec<String>, bool) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("certificate parses");
    let sans = cert
        .subject_alternative_name()
        .expect("SAN extension parses")
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    (sans, is_ca)
}

/// A TLS client config that trusts only `ca_pem`, no ALPN.
pub fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Every file below `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
