//! A small keep-alive `HEAD` load generator over TLS and HTTP/1.1, for bench/run.sh's
//! manifest-hit figure (wrk and h2load wait for a body after `HEAD` and stall).
//!
//! `cargo bench --bench head_load -- --url https://127.0.0.1:PORT/v2/... --ca ca.pem
//!   --sni quay.io --host quay.io:PORT --connections 64 --seconds 5`
//!
//! Prints `requests=N seconds=S rps=R errors=E non2xx=X`. Without `--url` it prints usage
//! and exits, so a plain `cargo bench` passes over it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    url: String,
    ca: String,
    sni: String,
    host: Option<String>,
    accept: String,
    connections: usize,
    seconds: f64,
    threads: usize,
}

fn parse() -> Option<Args> {
    let mut a = Args {
        url: String::new(),
        ca: String::new(),
        sni: String::new(),
        host: None,
        accept: "application/vnd.oci.image.manifest.v1+json".into(),
        connections: 64,
        seconds: 5.0,
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--url" => a.url = it.next()?,
            "--ca" => a.ca = it.next()?,
            "--sni" => a.sni = it.next()?,
            "--host" => a.host = Some(it.next()?),
            "--accept" => a.accept = it.next()?,
            "--connections" => a.connections = it.next()?.parse().ok()?,
            "--seconds" => a.seconds = it.next()?.parse().ok()?,
            "--threads" => a.threads = it.next()?.parse().ok()?,
            _ => {} // `cargo bench` passes --bench
        }
    }
    (!a.url.is_empty() && !a.ca.is_empty() && !a.sni.is_empty()).then_some(a)
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    non2xx: AtomicU64,
    errors: AtomicU64,
}

fn main() {
    let Some(args) = parse() else {
        eprintln!("usage: head_load --url https://IP:PORT/PATH --ca CA.pem --sni NAME [--host HOST] [--connections 64] [--seconds 5] [--threads 2]");
        return;
    };
    let rest = args.url.strip_prefix("https://").expect("https URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let host = args.host.clone().unwrap_or_else(|| authority.to_owned());
    let request = format!(
        "HEAD {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {}\r\nUser-Agent: head_load\r\n\r\n",
        args.accept
    );
    let request: Arc<[u8]> = request.into_bytes().into();

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&args.ca).expect("read CA file") {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let sni = ServerName::try_from(args.sni.clone()).expect("SNI name");
    let addr: std::net::SocketAddr = authority.parse().expect("URL authority must be IP:port");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .expect("runtime");
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let elapsed = rt.block_on(async {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.connections {
            let (connector, sni, request, counts, stop) = (
                connector.clone(),
                sni.clone(),
                request.clone(),
                counts.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(_e) =
                        connection(addr, &connector, sni.clone(), &request, &counts, &stop).await
                    {
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let elapsed = start.elapsed().as_secs_f64();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        elapsed
    });
    let ok = counts.ok.load(Ordering::Relaxed);
    let non2xx = counts.non2xx.load(Ordering::Relaxed);
    let total = ok + non2xx;
    println!(
        "requests={total} seconds={elapsed:.3} rps={:.1} errors={} non2xx={non2xx}",
        ok as f64 / elapsed,
        counts.errors.load(Ordering::Relaxed)
    );
    rt.shutdown_timeout(Duration::from_millis(100));
}

/// One keep-alive connection sending `HEAD`s back to back until told to stop.
async fn connection(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    sni: ServerName<'static>,
    request: &[u8],
    counts: &Counts,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut s = connector.connect(sni, tcp).await?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut have = 0usize;
    while !stop.load(Ordering::Relaxed) {
        s.write_all(request).await?;
        // Read one response head; HEAD responses have no body whatever they announce.
        let end = loop {
            if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if have == buf.len() {
                return Err(std::io::Error::other("response head too large"));
            }
            let n = s.read(&mut buf[have..]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            have += n;
        };
        let status = buf
            .get(9..12)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let close = buf[..end]
            .windows(17)
            .any(|w| w.eq_ignore_ascii_case(b"connection: close"));
        if (200..300).contains(&status) {
            counts.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            counts.non2xx.fetch_add(1, Ordering::Relaxed);
        }
        buf.copy_within(end..have, 0);
        have -= end;
        if close {
            return Ok(());
        }
    }
    Ok(())
}
