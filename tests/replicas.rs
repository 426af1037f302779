//! Past one machine: replicas sharing a blob tier, upstream proxy chaining, and addresses
//! (IPv4/IPv6 fallback, an IPv6 listener). Everything on loopback: fake registries from
//! `common`, plus three small fakes of this file's own: a corporate `CONNECT` proxy that
//! records every tunnel it opened, an S3 server that checks every request's SigV4
//! signature, and an echo server standing in for a non-registry host.
//!
//! These tests need their own `[upstream]` (a proxy, pins to unreachable or IPv6
//! addresses) and listener, so they start Stowage from a whole TOML text ([`Node`]) rather
//! than through the common fixture, whose `[upstream]` pins every fake host to 127.0.0.1.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn toml_path(p: &Path) -> String {
    toml_str(p.to_str().expect("utf-8 temp path"))
}

/// How a [`Node`] is configured beyond the defaults.
#[derive(Default)]
struct NodeConfig {
    /// `[proxy] listen`; default `127.0.0.1:0`.
    listen: Option<String>,
    /// Extra `key = value` lines for `[proxy]`.
    proxy: Vec<String>,
    /// Extra `key = value` lines for `[upstream]`.
    upstream: Vec<String>,
    /// `[upstream.resolve]`: host → TOML value (`"127.0.0.1"` or `["::1", "127.0.0.1"]`).
    resolve: BTreeMap<String, String>,
    /// Appended as is (whole tables, e.g. `[storage]`).
    extra: String,
}

impl NodeConfig {
    fn pin(mut self, host: &str, value: &str) -> Self {
        self.resolve.insert(host.to_owned(), value.to_owned());
        self
    }

    fn upstream(mut self, line: &str) -> Self {
        self.upstream.push(line.to_owned());
        self
    }
}

/// A Stowage server started from a TOML text this file writes; stopped when dropped.
struct Node {
    addr: SocketAddr,
    ca_pem: String,
    cache_dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(ca: &TestCa, c: NodeConfig) -> Node {
        init_tracing();
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let cache_dir = dir.path().join("cache");
        let mut upstream = c.upstream.clone();
        if !upstream.iter().any(|l| l.starts_with("connect_timeout")) {
            upstream.push("connect_timeout = \"2s\"".into());
        }
        let mut toml = format!(
            "[proxy]\nlisten = {}\n{}\n\n[ca]\ndir = {}\n\n[cache]\ndir = {}\n\n[upstream]\nextra_ca = [{}]\n{}\n\n[upstream.resolve]\n",
            toml_str(c.listen.as_deref().unwrap_or("127.0.0.1:0")),
            c.proxy.join("\n"),
            toml_path(&dir.path().join("certs")),
            toml_path(&cache_dir),
            toml_path(ca.pem_path()),
            upstream.join("\n"),
        );
        for (host, value) in &c.resolve {
            toml.push_str(&format!("{} = {value}\n", toml_str(host)));
        }
        toml.push('\n');
        toml.push_str(&c.extra);
        let config = ::stowage::Config::from_toml_str(&toml)
            .unwrap_or_else(|e| panic!("config rejected: {e}\n{toml}"));
        let server = ::stowage::Server::bind(config)
            .await
            .unwrap_or_else(|e| panic!("Server::bind: {e}\n{toml}"));
        let addr = server.proxy_addr();
        let ca_pem = server.ca_cert_pem();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Node {
            addr,
            ca_pem,
            cache_dir,
            shutdown: Some(tx),
            _dir: dir,
        }
    }

    fn client(&self) -> ProxyClient {
        ProxyClient::via_proxy(self.addr, &self.ca_pem)
    }

    fn is_cached(&self, digest: &str) -> bool {
        let hex = &digest["sha256:".len()..];
        self.cache_dir
            .join("blobs")
            .join("sha256")
            .join(&hex[..2])
            .join(hex)
            .is_file()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// `[storage]` for a shared directory.
fn dir_storage(shared: &Path) -> String {
    format!(
        "[storage]\nbackend = \"dir\"\ndir = {}\n",
        toml_path(shared)
    )
}

/// Where the shared tier keeps `digest` (`<prefix>blobs/sha256/<hex>`).
fn shared_key(prefix: &str, digest: &str) -> String {
    format!("{prefix}blobs/sha256/{}", &digest["sha256:".len()..])
}

// ---------------------------------------------------------------------------------------
// Shared blob tier: a directory
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_fetched_by_one_replica_is_served_by_another_from_a_shared_directory() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image(
        "team/app",
        "v1",
        &[pseudo_random(300_000, 101), pseudo_random(40_000, 102)],
    );
    let shared = tempfile::tempdir().unwrap();
    let config = || {
        NodeConfig {
            extra: dir_storage(shared.path()),
            ..NodeConfig::default()
        }
        .pin("quay.io", "\"127.0.0.1\"")
    };
    let a = Node::start(&ca, config()).await;
    let b = Node::start(&ca, config()).await;

    let first = pull(
        &a.client(),
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(first.blob_x_cache(), ["miss", "miss", "miss"]);
    assert_eq!(quay.blob_gets(), 3);
    // Replica A uploads what it verified: the shared directory holds exactly those bytes.
    for (d, r) in &first.blobs {
        let path = shared.path().join(shared_key("", d));
        eventually(&format!("{d} in the shared directory"), || path.is_file()).await;
        let stored = std::fs::read(&path).unwrap();
        assert_eq!(
            sha256_digest(&stored),
            *d,
            "the shared directory holds wrong bytes for {d}"
        );
        assert_eq!(stored, r.body);
    }

    // Replica B has never seen the image: blobs come from the shared tier, not upstream.
    assert!(img.blobs().iter().all(|d| !b.is_cached(d)));
    let second = pull(
        &b.client(),
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::H2,
    )
    .await;
    assert_eq!(second.manifest_digest, img.manifest);
    assert_eq!(second.blob_x_cache(), ["hit", "hit", "hit"]);
    assert_eq!(
        quay.blob_gets(),
        3,
        "replica B fetched blobs upstream: {:#?}",
        quay.requests()
    );
    // ... and are kept in B's own hot tier, verified.
    for d in img.blobs() {
        eventually(&format!("{d} in replica B's local cache"), || {
            b.is_cached(&d)
        })
        .await;
    }
    let third = pull(
        &b.client(),
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(third.blob_x_cache(), ["hit", "hit", "hit"]);
    assert_eq!(quay.blob_gets(), 3);
    // Nothing but the three objects (no temp files left behind by the uploads).
    let mut names: Vec<String> = walk(shared.path())
        .iter()
        .map(|p| {
            p.strip_prefix(shared.path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    let mut expected: Vec<String> = img.blobs().iter().map(|d| shared_key("", d)).collect();
    expected.sort();
    assert_eq!(names, expected);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Shared blob tier: an S3-compatible store
// ---------------------------------------------------------------------------------------

const S3_ACCESS_KEY: &str = "AKIDSTOWAGETEST";
const S3_SECRET_KEY: &str = "s3cr3t/Stowage+Test";
const S3_REGION: &str = "eu-test-1";

/// One request the fake S3 answered.
#[derive(Clone, Debug)]
struct S3Request {
    method: Method,
    path: String,
    status: u16,
    /// Why the signature was refused, if it was.
    refused: Option<String>,
}

#[derive(Default)]
struct S3State {
    objects: Mutex<HashMap<String, Bytes>>,
    log: Mutex<Vec<S3Request>>,
}

/// A plain-HTTP S3 endpoint (path style) for one bucket: `GET`, `HEAD` and `PUT` of
/// objects, each refused with 403 unless its SigV4 signature is right for the test
/// credentials.
struct FakeS3 {
    addr: SocketAddr,
    bucket: String,
    state: Arc<S3State>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeS3 {
    async fn start(bucket: &str) -> FakeS3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(S3State::default());
        let (st, bucket_owned) = (state.clone(), bucket.to_owned());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (st, bucket) = (st.clone(), bucket_owned.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (st, bucket) = (st.clone(), bucket.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(s3_handle(&st, &bucket, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        FakeS3 {
            addr,
            bucket: bucket.to_owned(),
            state,
            _task: task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<S3Request> {
        self.state.log.lock().unwrap().clone()
    }

    fn count(&self, method: &Method) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method)
            .count()
    }

    fn objects(&self) -> HashMap<String, Bytes> {
        self.state.objects.lock().unwrap().clone()
    }

    /// `[storage]` for this bucket, with the credentials in `creds`.
    fn storage_toml(&self, prefix: &str, creds: &Path) -> String {
        format!(
            "[storage]\nbackend = \"s3\"\nbucket = {}\nprefix = {}\nendpoint = {}\nregion = {}\npath_style = true\ncredentials_file = {}\n",
            toml_str(&self.bucket),
            toml_str(prefix),
            toml_str(&self.endpoint()),
            toml_str(S3_REGION),
            toml_path(creds),
        )
    }
}

fn s3_response(status: StatusCode, body: impl Into<Bytes>) -> http::Response<Full<Bytes>> {
    let body = body.into();
    let mut r = http::Response::new(Full::new(body.clone()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, body.len().into());
    r
}

async fn s3_handle(
    st: &S3State,
    bucket: &str,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let refused = check_sigv4(&req).err();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let key = path.strip_prefix(&format!("/{bucket}/")).map(str::to_owned);
    let resp = match (&refused, key) {
        (Some(why), _) => s3_response(
            StatusCode::FORBIDDEN,
            format!("<Error><Code>SignatureDoesNotMatch</Code><Message>{why}</Message></Error>"),
        ),
        (None, None) => s3_response(
            StatusCode::NOT_FOUND,
            "<Error><Code>NoSuchBucket</Code></Error>",
        ),
        (None, Some(key)) => match method {
            Method::PUT => {
                let declared = parts
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok());
                if declared != Some(body.len()) {
                    s3_response(
                        StatusCode::BAD_REQUEST,
                        "<Error><Code>IncompleteBody</Code></Error>",
                    )
                } else {
                    st.objects.lock().unwrap().insert(key, body);
                    s3_response(StatusCode::OK, "")
                }
            }
            Method::GET | Method::HEAD => match st.objects.lock().unwrap().get(&key).cloned() {
                Some(data) => {
                    let len = data.len();
                    let mut r = s3_response(
                        StatusCode::OK,
                        if method == Method::HEAD {
                            Bytes::new()
                        } else {
                            data
                        },
                    );
                    r.headers_mut()
                        .insert(http::header::CONTENT_LENGTH, len.into());
                    r
                }
                None => s3_response(
                    StatusCode::NOT_FOUND,
                    if method == Method::HEAD {
                        ""
                    } else {
                        "<Error><Code>NoSuchKey</Code></Error>"
                    },
                ),
            },
            _ => s3_response(StatusCode::METHOD_NOT_ALLOWED, ""),
        },
    };
    st.log.lock().unwrap().push(S3Request {
        method,
        path,
        status: resp.status().as_u16(),
        refused,
    });
    resp
}

fn hmac_sha256(key: &[u8], msg: &str) -> Vec<u8> {
    use aws_lc_rs::hmac;
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg.as_bytes())
        .as_ref()
        .to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

/// Verifies an AWS Signature Version 4 `Authorization` header the way S3 does: rebuilds
/// the canonical request from what arrived (method, path, query, the signed headers as
/// received, the payload hash header), derives the signing key from the secret, and
/// compares signatures.
fn check_sigv4<B>(req: &http::Request<B>) -> Result<(), String> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let auth = header("authorization").ok_or("no Authorization")?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not AWS4-HMAC-SHA256")?;
    let mut fields = HashMap::new();
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or("malformed Authorization")?;
        fields.insert(k.to_owned(), v.to_owned());
    }
    let credential = fields.get("Credential").ok_or("no Credential")?;
    let signed_headers = fields.get("SignedHeaders").ok_or("no SignedHeaders")?;
    let signature = fields.get("Signature").ok_or("no Signature")?;
    let cred: Vec<&str> = credential.split('/').collect();
    let [access_key, date, region, service, terminator] = cred[..] else {
        return Err(format!(
            "Credential {credential:?} is not key/date/region/service/aws4_request"
        ));
    };
    if access_key != S3_ACCESS_KEY {
        return Err(format!("unknown access key {access_key}"));
    }
    if region != S3_REGION || service != "s3" || terminator != "aws4_request" {
        return Err(format!("wrong scope {credential}"));
    }
    let amz_date = header("x-amz-date").ok_or("no x-amz-date")?;
    if amz_date.len() != 16 || !amz_date.starts_with(date) || !amz_date.ends_with('Z') {
        return Err(format!(
            "x-amz-date {amz_date:?} does not match the scope date {date}"
        ));
    }
    let payload = header("x-amz-content-sha256").ok_or("no x-amz-content-sha256")?;
    let names: Vec<&str> = signed_headers.split(';').collect();
    for required in ["host", "x-amz-date", "x-amz-content-sha256"] {
        if !names.contains(&required) {
            return Err(format!("{required} is not signed"));
        }
    }
    let mut sorted = names.clone();
    sorted.sort();
    if sorted != names {
        return Err("SignedHeaders not sorted".into());
    }
    let mut canonical_headers = String::new();
    for n in &names {
        let v = header(n).ok_or_else(|| format!("signed header {n} missing from the request"))?;
        canonical_headers.push_str(&format!("{n}:{}\n", v.trim()));
    }
    let mut query: Vec<&str> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|q| !q.is_empty())
        .collect();
    query.sort();
    let canonical = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{payload}",
        req.method(),
        req.uri().path(),
        query.join("&")
    );
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{date}/{region}/s3/aws4_request\n{}",
        sha256_hex(canonical.as_bytes())
    );
    let k = hmac_sha256(format!("AWS4{S3_SECRET_KEY}").as_bytes(), date);
    let k = hmac_sha256(&k, region);
    let k = hmac_sha256(&k, "s3");
    let k = hmac_sha256(&k, "aws4_request");
    let expected = hex::encode(hmac_sha256(&k, &to_sign));
    if *signature != expected {
        return Err(format!(
            "signature mismatch; canonical request was {canonical:?}"
        ));
    }
    Ok(())
}

fn write_credentials(dir: &Path, secret: &str) -> PathBuf {
    let path = dir.join("s3.toml");
    std::fs::write(
        &path,
        format!(
            "access_key_id = {}\nsecret_access_key = {}\n",
            toml_str(S3_ACCESS_KEY),
            toml_str(secret)
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_blobs_through_an_s3_bucket_with_signed_requests() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image(
        "team/app",
        "v1",
        &[pseudo_random(200_000, 111), pseudo_random(30_000, 112)],
    );
    let s3 = FakeS3::start("stowage-blobs").await;
    let secrets = tempfile::tempdir().unwrap();
    let creds = write_credentials(secrets.path(), S3_SECRET_KEY);
    let config = || {
        NodeConfig {
            extra: s3.storage_toml("fleet/", &creds),
            ..NodeConfig::default()
        }
        .pin("quay.io", "\"127.0.0.1\"")
    };
    let a = Node::start(&ca, config()).await;
    let b = Node::start(&ca, config()).await;

    let first = pull(
        &a.client(),
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(first.blob_x_cache(), ["miss", "miss", "miss"]);
    assert_eq!(quay.blob_gets(), 3);
    let keys: Vec<String> = img
        .blobs()
        .iter()
        .map(|d| format!("{}/{}", s3.bucket, shared_key("fleet/", d)))
        .collect();
    eventually("replica A uploaded every blob", || s3.objects().len() == 3).await;
    // Exactly the verified bytes, each under the key of its own digest.
    let objects = s3.objects();
    for d in img.blobs() {
        let key = shared_key("fleet/", &d);
        let data = objects.get(&key).unwrap_or_else(|| {
            panic!(
                "no object {key}; bucket holds {:?}",
                objects.keys().collect::<Vec<_>>()
            )
        });
        assert_eq!(
            sha256_digest(data),
            d,
            "{key} holds bytes that do not hash to its digest"
        );
    }
    let refused: Vec<_> = s3
        .requests()
        .into_iter()
        .filter(|r| r.refused.is_some())
        .collect();
    assert!(
        refused.is_empty(),
        "requests with a bad signature: {refused:#?}"
    );
    assert_eq!(s3.count(&Method::PUT), 3, "{:#?}", s3.requests());

    let second = pull(
        &b.client(),
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(second.blob_x_cache(), ["hit", "hit", "hit"]);
    assert_eq!(
        quay.blob_gets(),
        3,
        "replica B fetched blobs upstream: {:#?}",
        quay.requests()
    );
    let gets: Vec<String> = s3
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::GET && r.status == 200)
        .map(|r| r.path)
        .collect();
    for k in &keys {
        assert!(
            gets.contains(&format!("/{k}")),
            "replica B did not read {k} from the bucket: {gets:?}"
        );
    }
    for d in img.blobs() {
        eventually("replica B keeps the blobs in its hot tier", || {
            b.is_cached(&d)
        })
        .await;
    }
    // Content read from the bucket is not uploaded again.
    assert_eq!(s3.count(&Method::PUT), 3, "{:#?}", s3.requests());
    assert!(
        s3.requests().iter().all(|r| r.refused.is_none()),
        "{:#?}",
        s3.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_s3_store_falls_back_to_upstream() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(50_000, 121)]);
    let s3 = FakeS3::start("stowage-blobs").await;
    let secrets = tempfile::tempdir().unwrap();
    // The wrong secret: every request to the bucket is refused (403).
    let creds = write_credentials(secrets.path(), "not-the-secret");
    let node = Node::start(
        &ca,
        NodeConfig {
            extra: s3.storage_toml("", &creds),
            ..NodeConfig::default()
        }
        .pin("quay.io", "\"127.0.0.1\""),
    )
    .await;

    let pulled = pull(
        &node.client(),
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::H2,
    )
    .await;
    assert_eq!(pulled.blob_x_cache(), ["miss", "miss"]);
    assert_eq!(quay.blob_gets(), 2);
    for d in img.blobs() {
        eventually("stored locally all the same", || node.is_cached(&d)).await;
    }
    eventually("uploads attempted", || {
        s3.count(&Method::HEAD) + s3.count(&Method::PUT) >= 2
    })
    .await;
    let requests = s3.requests();
    assert!(
        !requests.is_empty()
            && requests
                .iter()
                .all(|r| r.status == 403 && r.refused.is_some()),
        "{requests:#?}"
    );
    assert!(s3.objects().is_empty());
}

// ---------------------------------------------------------------------------------------
// Upstream proxy chaining
// ---------------------------------------------------------------------------------------

/// A corporate HTTP proxy: answers `CONNECT host:port` by connecting to 127.0.0.1:port
/// (its own "DNS" puts every name on loopback) and relaying bytes. Records every request
/// line it got.
struct FakeConnectProxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeConnectProxy {
    async fn start() -> FakeConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(proxy_connection(tcp, s.clone()));
            }
        });
        FakeConnectProxy {
            addr,
            seen,
            _task: task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Request lines received, e.g. `CONNECT quay.io:1234 HTTP/1.1`.
    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Whether a tunnel to `authority` was asked for.
    fn connected_to(&self, authority: &str) -> bool {
        self.seen()
            .iter()
            .any(|l| l.starts_with(&format!("CONNECT {authority} ")))
    }

    fn saw_host(&self, host: &str) -> bool {
        self.seen().iter().any(|l| l.contains(host))
    }
}

async fn proxy_connection(mut client: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut b).await {
            Ok(1) if head.len() < 16 * 1024 => head.push(b[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let line = text.lines().next().unwrap_or("").to_owned();
    // The request line, plus the credentials when some came: `... [Basic dXNlcjpwdw==]`.
    let auth = text.lines().find_map(|l| {
        l.strip_prefix("Proxy-Authorization: ")
            .or_else(|| l.strip_prefix("proxy-authorization: "))
    });
    seen.lock().unwrap().push(match auth {
        Some(a) => format!("{line} [{a}]"),
        None => line.clone(),
    });
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let port = target
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok());
    let (true, Some(port)) = (method == "CONNECT", port) else {
        let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        return;
    };
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)).await else {
        let _ = client
            .write_all(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Whether a TCP connection to `addr` is refused (or otherwise fails) quickly.
async fn unreachable(addr: SocketAddr) -> bool {
    !matches!(
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_go_through_the_configured_proxy_except_no_proxy_hosts() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let ghcr = FakeRegistry::builder(&ca).host("ghcr.io").build().await;
    quay.push_image("team/app", "v1", &[pseudo_random(120_000, 131)]);
    ghcr.push_image("org/tool", "v2", &[pseudo_random(60_000, 132)]);
    let (echo_port, echo_accepted, _echo) = echo_server().await;
    let corp = FakeConnectProxy::start().await;
    // Names reached through the proxy are pinned where nothing listens: only the proxy
    // (which puts every name on 127.0.0.1) can reach them.
    assert!(
        unreachable(SocketAddr::from(([127, 0, 0, 2], quay.port()))).await,
        "127.0.0.2 must not reach the fake registry"
    );
    let node = Node::start(
        &ca,
        NodeConfig {
            proxy: vec![format!("tunnel_ports = [{echo_port}]")],
            ..NodeConfig::default()
        }
        .upstream(&format!("proxy = {}", toml_str(&corp.url())))
        .upstream("no_proxy = \"ghcr.io, direct.test\"")
        .pin("quay.io", "\"127.0.0.2\"")
        .pin("tunnel.test", "\"127.0.0.2\"")
        .pin("ghcr.io", "\"127.0.0.1\"")
        .pin("direct.test", "\"127.0.0.1\""),
    )
    .await;
    let client = node.client();

    // A registry: the pull works, over a tunnel the corporate proxy opened.
    let pulled = pull(
        &client,
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(pulled.blob_x_cache(), ["miss", "miss"]);
    assert!(
        corp.connected_to(&format!("quay.io:{}", quay.port())),
        "the proxy saw {:?}",
        corp.seen()
    );
    assert!(
        corp.seen().iter().all(|l| l.starts_with("CONNECT ")),
        "{:?}",
        corp.seen()
    );

    // A host that is not a registry: Stowage's blind tunnel goes through the proxy too.
    echo_through(&client, &format!("tunnel.test:{echo_port}"), 133, 50_000).await;
    assert!(
        corp.connected_to(&format!("tunnel.test:{echo_port}")),
        "the proxy saw {:?}",
        corp.seen()
    );
    assert_eq!(echo_accepted.load(Ordering::SeqCst), 1);

    // no_proxy hosts are reached directly: a registry and a blind tunnel.
    let before = corp.seen().len();
    pull(&client, "ghcr.io", ghcr.port(), "org/tool", "v2", Alpn::H2).await;
    echo_through(&client, &format!("direct.test:{echo_port}"), 134, 50_000).await;
    assert_eq!(echo_accepted.load(Ordering::SeqCst), 2);
    assert!(ghcr.blob_gets() == 2);
    assert!(
        !corp.saw_host("ghcr.io") && !corp.saw_host("direct.test"),
        "no_proxy hosts went through the proxy: {:?}",
        &corp.seen()[before..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_the_tunnel_is_a_clean_502() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(1000, 141)]);
    // Something that speaks HTTP but is no CONNECT proxy: every request is a 403.
    let (addr, refusals, _task) = counting_server(|mut s| async move {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    })
    .await;
    let node = Node::start(
        &ca,
        NodeConfig::default()
            .upstream(&format!("proxy = \"http://{addr}\""))
            .pin("quay.io", "\"127.0.0.1\""),
    )
    .await;
    let t = node
        .client()
        .tunnel("quay.io", quay.port(), Alpn::Http11)
        .await
        .expect("the client's tunnel opens; upstream is reached per request");
    let started = Instant::now();
    let r = t
        .get(
            &format!("/v2/team/app/blobs/{}", img.layers[0]),
            &[("authorization", "Bearer x")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert!(r.json()["errors"][0]["code"].is_string(), "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        refusals.load(Ordering::SeqCst) >= 1,
        "the proxy was never asked"
    );
    assert_eq!(
        quay.requests().len(),
        0,
        "upstream reached around the proxy: {:#?}",
        quay.requests()
    );
}

// ---------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reachable_only_over_ipv4_works_when_its_name_also_resolves_to_ipv6() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(150_000, 151)]);
    let (echo_port, echo_accepted, _echo) = echo_server().await;
    // The fake listens on 127.0.0.1 only: the IPv6 address is unreachable (refused, or no
    // IPv6 at all on this machine).
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, quay.port()));
    assert!(
        unreachable(v6).await,
        "something listens on {v6}; cannot test the fallback"
    );
    assert!(unreachable(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, echo_port))).await);
    let node = Node::start(
        &ca,
        NodeConfig {
            proxy: vec![format!("tunnel_ports = [{echo_port}]")],
            ..NodeConfig::default()
        }
        .pin("quay.io", "[\"::1\", \"127.0.0.1\"]")
        .pin("tunnel.test", "[\"::1\", \"127.0.0.1\"]"),
    )
    .await;
    let client = node.client();

    let started = Instant::now();
    let pulled = pull(
        &client,
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(pulled.manifest_digest, img.manifest);
    assert_eq!(pulled.blob_x_cache(), ["miss", "miss"]);
    // A second repository on new connections: the fallback is not a one-off.
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::H2).await;
    assert_eq!(s.manifest(&img.manifest).await.status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the fallback took {:?}",
        started.elapsed()
    );
    // Blind tunnels fall back the same way.
    echo_through(&client, &format!("tunnel.test:{echo_port}"), 152, 50_000).await;
    assert_eq!(echo_accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stowage_serves_a_pull_on_an_ipv6_loopback_listener() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        eprintln!("SKIPPED stowage_serves_a_pull_on_an_ipv6_loopback_listener: no IPv6 loopback on this machine ({e})");
        return;
    }
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(80_000, 161)]);
    let node = Node::start(
        &ca,
        NodeConfig {
            listen: Some("[::1]:0".into()),
            ..NodeConfig::default()
        }
        .pin("quay.io", "\"127.0.0.1\""),
    )
    .await;
    assert!(
        node.addr.is_ipv6() && node.addr.ip().is_loopback(),
        "{}",
        node.addr
    );
    let client = node.client();
    let pulled = pull(
        &client,
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::Both,
    )
    .await;
    assert_eq!(pulled.manifest_digest, img.manifest);
    assert_eq!(pulled.blob_x_cache(), ["miss", "miss"]);
    let again = pull(
        &client,
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(again.blob_x_cache(), ["hit", "hit"]);
    assert_eq!(client.proxy_get("/healthz").await.status, StatusCode::OK);
}

/// Asks `node` for `digest` twice: the first answer, from wrong bytes in the shared store,
/// must not be delivered complete, nor cached; the second (a new connection, as the aborted
/// response ended the last one) must be the right bytes, fetched upstream.
async fn wrong_shared_bytes_then_right_ones(
    node: &Node,
    quay: &FakeRegistry,
    digest: &str,
    data: &[u8],
) {
    let s = Session::login(
        &node.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::Http11,
    )
    .await;
    match s.request_raw(Method::GET, &s.blob_path(digest), &[]).await {
        Ok(r) if r.status.is_success() => {
            assert_eq!(r.x_cache(), "hit", "served from the shared store");
            assert!(
                r.body_error.is_some() || r.body.len() < data.len(),
                "wrong bytes from the shared store were delivered complete"
            );
        }
        Ok(r) => panic!("unexpected {}: {}", r.status, r.text()),
        Err(_) => {}
    }
    assert_eq!(quay.blob_gets(), 0);
    assert!(!node.is_cached(digest), "wrong bytes were cached");

    let s = Session::login(
        &node.client(),
        "quay.io",
        quay.port(),
        "team/app",
        Alpn::Http11,
    )
    .await;
    let r = s.blob(digest).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256_digest(&r.body), digest, "X-Cache {}", r.x_cache());
    assert_eq!(r.x_cache(), "miss");
    assert_eq!(quay.blob_gets(), 1);
    eventually("stored locally", || node.is_cached(digest)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_in_a_shared_directory_are_never_served_and_get_replaced() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(200_000, 171);
    let digest = quay.push_blob("team/app", data.clone());
    let shared = tempfile::tempdir().unwrap();
    // Another writer (a bug, bit rot, a hostile mount) left wrong bytes under the key.
    let path = shared.path().join(shared_key("", &digest));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut wrong = data.clone();
    wrong[100_000] ^= 0xff;
    std::fs::write(&path, &wrong).unwrap();
    let node = Node::start(
        &ca,
        NodeConfig {
            extra: dir_storage(shared.path()),
            ..NodeConfig::default()
        }
        .pin("quay.io", "\"127.0.0.1\""),
    )
    .await;

    wrong_shared_bytes_then_right_ones(&node, &quay, &digest, &data).await;
    // The verified upload replaced the wrong object.
    eventually("the shared object replaced", || {
        std::fs::read(&path).is_ok_and(|b| b == data)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_in_an_s3_bucket_are_never_served_and_get_replaced() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(150_000, 172);
    let digest = quay.push_blob("team/app", data.clone());
    let s3 = FakeS3::start("stowage-blobs").await;
    let key = shared_key("", &digest);
    // Longer than the real blob, this time.
    let mut wrong = data.clone();
    wrong.extend_from_slice(b"trailing garbage");
    s3.state
        .objects
        .lock()
        .unwrap()
        .insert(key.clone(), Bytes::from(wrong));
    let secrets = tempfile::tempdir().unwrap();
    let creds = write_credentials(secrets.path(), S3_SECRET_KEY);
    let node = Node::start(
        &ca,
        NodeConfig {
            extra: s3.storage_toml("", &creds),
            ..NodeConfig::default()
        }
        .pin("quay.io", "\"127.0.0.1\""),
    )
    .await;

    wrong_shared_bytes_then_right_ones(&node, &quay, &digest, &data).await;
    eventually("the object replaced", || {
        s3.objects()
            .get(&key)
            .is_some_and(|b| sha256_digest(b) == digest)
    })
    .await;
    assert!(
        s3.requests().iter().all(|r| r.refused.is_none()),
        "{:#?}",
        s3.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_proxy_url_are_sent_to_the_proxy() {
    use base64::Engine;
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    quay.push_image("team/app", "v1", &[pseudo_random(10_000, 181)]);
    let (echo_port, _accepted, _echo) = echo_server().await;
    let corp = FakeConnectProxy::start().await;
    let node = Node::start(
        &ca,
        NodeConfig {
            proxy: vec![format!("tunnel_ports = [{echo_port}]")],
            ..NodeConfig::default()
        }
        .upstream(&format!(
            "proxy = \"http://corp-user:s3cret@{}\"",
            corp.addr
        ))
        .pin("quay.io", "\"127.0.0.2\"")
        .pin("tunnel.test", "\"127.0.0.2\""),
    )
    .await;
    pull(
        &node.client(),
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::Http11,
    )
    .await;
    echo_through(
        &node.client(),
        &format!("tunnel.test:{echo_port}"),
        182,
        50_000,
    )
    .await;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("corp-user:s3cret")
    );
    for target in [
        format!("quay.io:{}", quay.port()),
        format!("tunnel.test:{echo_port}"),
    ] {
        let expected = format!("CONNECT {target} HTTP/1.1 [{basic}]");
        assert!(
            corp.seen().contains(&expected),
            "no {expected:?} in {:?}",
            corp.seen()
        );
    }
}

/// A listener on `[::1]:port` whose accept queue is full, so further SYNs are dropped: an
/// IPv6 address that swallows connection attempts, like an unroutable AAAA record. `None`
/// when this machine cannot make one (no IPv6 loopback, or SYNs still answered).
async fn ipv6_blackhole(port: u16) -> Option<(tokio::net::TcpListener, Vec<TcpStream>)> {
    let addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let sock = tokio::net::TcpSocket::new_v6().ok()?;
    sock.bind(addr).ok()?;
    let listener = sock.listen(0).ok()?;
    let mut held = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    let probe = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await;
    probe.is_err().then_some((listener, held))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_address_that_swallows_connections_costs_a_fraction_of_a_second() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let img = quay.push_image("team/app", "v1", &[pseudo_random(20_000, 191)]);
    let (echo_port, _accepted, _echo) = echo_server().await;
    let Some(_registry_hole) = ipv6_blackhole(quay.port()).await else {
        eprintln!("SKIPPED: cannot make an IPv6 address that drops SYNs on this machine");
        return;
    };
    let Some(_echo_hole) = ipv6_blackhole(echo_port).await else {
        eprintln!("SKIPPED: cannot make an IPv6 address that drops SYNs on this machine");
        return;
    };
    let node = Node::start(
        &ca,
        NodeConfig {
            proxy: vec![format!("tunnel_ports = [{echo_port}]")],
            ..NodeConfig::default()
        }
        .upstream("connect_timeout = \"5s\"")
        .pin("quay.io", "[\"::1\", \"127.0.0.1\"]")
        .pin("tunnel.test", "[\"::1\", \"127.0.0.1\"]"),
    )
    .await;
    let client = node.client();
    let started = Instant::now();
    let pulled = pull(
        &client,
        "quay.io",
        quay.port(),
        "team/app",
        "v1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(pulled.manifest_digest, img.manifest);
    let pull_took = started.elapsed();
    let started = Instant::now();
    echo_through(&client, &format!("tunnel.test:{echo_port}"), 192, 50_000).await;
    let tunnel_took = started.elapsed();
    eprintln!("pull {pull_took:?}, tunnel {tunnel_took:?}");
    assert!(
        pull_took < Duration::from_secs(3),
        "the pull waited for the IPv6 address: {pull_took:?}"
    );
    assert!(
        tunnel_took < Duration::from_secs(2),
        "the blind tunnel waited for the IPv6 address: {tunnel_took:?}"
    );
}
