//! The shared blob tier behind the local disk: where several replicas find what one of
//! them already fetched.
//!
//! `Backend` is the trait; `S3Backend` speaks the S3 API (AWS S3, MinIO, Ceph RGW, GCS's
//! XML API) with SigV4 signing over Stowage's own upstream client, and `FsBackend` is a
//! shared directory (an NFS mount, say). Objects are keyed by digest alone
//! (`<prefix>blobs/<alg>/<hex>`), written only after local verification, and written
//! idempotently (same key, same bytes), so racing replicas may upload twice but never
//! store wrong bytes. Readers verify again while filling their local tier; an object found
//! wrong there (another writer, bit rot) is quarantined: not read again by this replica, and
//! replaced by its next verified upload, so one bad object cannot block a blob for good.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use aws_lc_rs::hmac;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, StreamBody};

use crate::http_util::{Body as UpBody, BoxError};
use crate::oci::Digest;
use crate::settings::StorageConfig;
use crate::upstream::Upstream;

pub type BackendBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("shared store: {0}")]
    Failed(String),
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(e.to_string())
}

/// A second, shared tier of verified content.
pub trait Backend: Send + Sync {
    /// The object's body and length, or `None` when the store does not have it.
    fn get<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<(BackendBody, u64)>, BackendError>>;
    /// Stores verified content from a local file. Idempotent.
    fn put<'a>(
        &'a self,
        digest: &'a Digest,
        file: &'a Path,
        len: u64,
    ) -> futures_util::future::BoxFuture<'a, Result<(), BackendError>>;
    fn describe(&self) -> String;
}

/// Digests whose shared copy turned out not to hash to its key. Bounded: forgetting an
/// entry costs one more failed read, nothing worse.
#[derive(Default)]
struct Quarantine(std::sync::Mutex<std::collections::HashSet<Digest>>);

impl Quarantine {
    const MAX: usize = 10_000;

    fn contains(&self, digest: &Digest) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(digest)
    }

    fn insert(&self, digest: Digest) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() >= Self::MAX {
            set.clear();
        }
        set.insert(digest);
    }

    fn remove(&self, digest: &Digest) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(digest);
    }
}

/// A shared object's body, hashed on the way through: once `len` bytes have passed and they
/// do not hash to `digest`, the digest is quarantined. (The reader's own verification
/// still refuses the bytes; this only remembers the verdict for the store.)
struct Checked {
    inner: BackendBody,
    digest: Digest,
    hasher: Option<aws_lc_rs::digest::Context>,
    remaining: u64,
    quarantine: Arc<Quarantine>,
}

impl Checked {
    fn wrap(
        inner: BackendBody,
        digest: &Digest,
        len: u64,
        quarantine: Arc<Quarantine>,
    ) -> BackendBody {
        let alg = match digest.algorithm() {
            crate::oci::Algorithm::Sha256 => &aws_lc_rs::digest::SHA256,
            crate::oci::Algorithm::Sha512 => &aws_lc_rs::digest::SHA512,
        };
        let hasher = Some(aws_lc_rs::digest::Context::new(alg));
        Checked {
            inner,
            digest: digest.clone(),
            hasher,
            remaining: len,
            quarantine,
        }
        .boxed_unsync()
    }

    fn finish(&mut self) {
        let Some(h) = self.hasher.take() else { return };
        let got = Digest::from_bytes(self.digest.algorithm(), h.finish().as_ref());
        if self.remaining != 0 || got != self.digest {
            tracing::warn!(digest = %self.digest, "the shared store holds wrong bytes for this digest; quarantined until replaced");
            self.quarantine.insert(self.digest.clone());
        }
    }
}

impl http_body::Body for Checked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(data), Some(h)) = (f.data_ref(), this.hasher.as_mut()) {
                    h.update(data);
                    match this.remaining.checked_sub(data.len() as u64) {
                        Some(r) => this.remaining = r,
                        // Longer than announced: wrong either way.
                        None => this.remaining = 1,
                    }
                    if this.remaining == 0 {
                        this.finish();
                    }
                }
            }
            // A failed read says nothing about the object.
            Some(Err(_)) => this.hasher = None,
            None => this.finish(),
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.hasher.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn key(prefix: &str, digest: &Digest) -> String {
    format!(
        "{prefix}blobs/{}/{}",
        digest.algorithm().as_str(),
        digest.hex()
    )
}

/// A shared directory mounted on every replica.
pub struct FsBackend {
    root: PathBuf,
    quarantine: Arc<Quarantine>,
}

impl FsBackend {
    pub fn new(root: PathBuf) -> FsBackend {
        FsBackend {
            root,
            quarantine: Arc::default(),
        }
    }
}

impl Backend for FsBackend {
    fn get<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<(BackendBody, u64)>, BackendError>> {
        Box::pin(async move {
            if self.quarantine.contains(digest) {
                return Ok(None);
            }
            let path = self.root.join(key("", digest));
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(failed(e)),
            };
            let len = file.metadata().map_err(failed)?.len();
            let body = StreamBody::new(crate::cache::fill::file_stream(Arc::new(file), 0, len))
                .boxed_unsync();
            Ok(Some((
                Checked::wrap(body, digest, len, self.quarantine.clone()),
                len,
            )))
        })
    }

    fn put<'a>(
        &'a self,
        digest: &'a Digest,
        file: &'a Path,
        _len: u64,
    ) -> futures_util::future::BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let dest = self.root.join(key("", digest));
            let (file, dest) = (file.to_owned(), dest.clone());
            // A quarantined object is replaced (rename over it) rather than kept.
            let replace = self.quarantine.contains(digest);
            let done = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                if dest.exists() && !replace {
                    return Ok(());
                }
                let dir = dest.parent().expect("has parent");
                std::fs::create_dir_all(dir)?;
                let tmp = dir.join(format!(
                    ".{}.tmp-{}",
                    dest.file_name().unwrap().to_string_lossy(),
                    std::process::id()
                ));
                std::fs::copy(&file, &tmp)?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &dest)
            })
            .await
            .map_err(failed)?
            .map_err(failed);
            if done.is_ok() {
                self.quarantine.remove(digest);
            }
            done
        })
    }

    fn describe(&self) -> String {
        format!("directory {}", self.root.display())
    }
}

/// An S3-compatible bucket.
pub struct S3Backend {
    upstream: Arc<Upstream>,
    endpoint: Uri,
    bucket: String,
    prefix: String,
    region: String,
    path_style: bool,
    access_key: String,
    secret_key: String,
    quarantine: Arc<Quarantine>,
}

impl S3Backend {
    pub fn new(config: &StorageConfig, upstream: Arc<Upstream>) -> Result<S3Backend, String> {
        let endpoint = config
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", config.region));
        let endpoint = without_default_port(
            endpoint
                .parse()
                .map_err(|_| format!("storage.endpoint {endpoint:?} is not a URL"))?,
        );
        let (access_key, secret_key) = config.s3_credentials()?;
        Ok(S3Backend {
            upstream,
            endpoint,
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            region: config.region.clone(),
            path_style: config.path_style.unwrap_or(config.endpoint.is_some()),
            access_key,
            secret_key,
            quarantine: Arc::default(),
        })
    }

    fn object_uri(&self, digest: &Digest) -> Uri {
        let scheme = self.endpoint.scheme_str().unwrap_or("https");
        let authority = self.endpoint.authority().map(|a| a.as_str()).unwrap_or("");
        let k = key(&self.prefix, digest);
        let s = if self.path_style {
            format!("{scheme}://{authority}/{}/{k}", self.bucket)
        } else {
            format!("{scheme}://{}.{authority}/{k}", self.bucket)
        };
        s.parse().expect("bucket, prefix and digest are URL-safe")
    }

    /// Signs a request with AWS SigV4 (unsigned payload).
    fn sign(&self, req: &mut Request<UpBody>, now: SystemTime) {
        let (date, datetime) = amz_dates(now);
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let headers = req.headers_mut();
        headers.insert(
            "x-amz-date",
            HeaderValue::from_str(&datetime).expect("ascii"),
        );
        headers.insert(
            "x-amz-content-sha256",
            HeaderValue::from_static("UNSIGNED-PAYLOAD"),
        );
        let canonical = format!(
            "{}\n{}\n\nhost:{}\nx-amz-content-sha256:UNSIGNED-PAYLOAD\nx-amz-date:{}\n\nhost;x-amz-content-sha256;x-amz-date\nUNSIGNED-PAYLOAD",
            req.method().as_str(),
            req.uri().path(),
            host,
            datetime
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{datetime}\n{scope}\n{}",
            hex::encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                canonical.as_bytes()
            ))
        );
        let mac = |k: &[u8], m: &str| {
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, k), m.as_bytes())
                .as_ref()
                .to_vec()
        };
        let k = mac(format!("AWS4{}", self.secret_key).as_bytes(), &date);
        let k = mac(&k, &self.region);
        let k = mac(&k, "s3");
        let k = mac(&k, "aws4_request");
        let signature = hex::encode(mac(&k, &to_sign));
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}",
            self.access_key
        );
        let mut v = HeaderValue::from_str(&auth).expect("ascii");
        v.set_sensitive(true);
        req.headers_mut().insert(http::header::AUTHORIZATION, v);
    }

    async fn send(
        &self,
        method: Method,
        digest: &Digest,
        body: UpBody,
        len: Option<u64>,
    ) -> Result<http::Response<UpBody>, BackendError> {
        let mut req = Request::builder()
            .method(method)
            .uri(self.object_uri(digest))
            .body(body)
            .expect("valid parts");
        if let Some(l) = len {
            req.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(l));
        }
        self.sign(&mut req, SystemTime::now());
        self.upstream.send(req).await.map_err(failed)
    }
}

impl Backend for S3Backend {
    fn get<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<(BackendBody, u64)>, BackendError>> {
        Box::pin(async move {
            if self.quarantine.contains(digest) {
                return Ok(None);
            }
            let resp = self
                .send(Method::GET, digest, crate::upstream::empty(), None)
                .await?;
            match resp.status() {
                StatusCode::OK => {
                    let len = resp
                        .headers()
                        .get(http::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| failed("object without Content-Length"))?;
                    let body = resp.into_body().map_err(BoxError::from).boxed_unsync();
                    Ok(Some((
                        Checked::wrap(body, digest, len, self.quarantine.clone()),
                        len,
                    )))
                }
                StatusCode::NOT_FOUND => Ok(None),
                s => Err(failed(format!("GET answered {s}"))),
            }
        })
    }

    fn put<'a>(
        &'a self,
        digest: &'a Digest,
        file: &'a Path,
        len: u64,
    ) -> futures_util::future::BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            // Same key, same bytes: skip the upload when another replica already did it,
            // unless the object there was found wrong (then it is overwritten).
            let replace = self.quarantine.contains(digest);
            if !replace {
                let head = self
                    .send(Method::HEAD, digest, crate::upstream::empty(), None)
                    .await?;
                if head.status() == StatusCode::OK {
                    return Ok(());
                }
            }
            let f = std::fs::File::open(file).map_err(failed)?;
            let body = StreamBody::new(crate::cache::fill::file_stream(Arc::new(f), 0, len))
                .boxed_unsync();
            let resp = self.send(Method::PUT, digest, body, Some(len)).await?;
            if !resp.status().is_success() {
                let status = resp.status();
                let text = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                return Err(failed(format!(
                    "PUT answered {status}: {}",
                    String::from_utf8_lossy(&text)
                        .chars()
                        .take(300)
                        .collect::<String>()
                )));
            }
            self.quarantine.remove(digest);
            Ok(())
        })
    }

    fn describe(&self) -> String {
        format!("s3 bucket {} at {}", self.bucket, self.endpoint)
    }
}

/// The endpoint with a port that is its scheme's default (`https://host:443`) dropped: the
/// HTTP/1.1 client sends `Host` without it, and the signature covers `Host` as sent.
fn without_default_port(u: Uri) -> Uri {
    let default = match u.scheme_str() {
        Some("https") => 443,
        Some("http") => 80,
        _ => return u,
    };
    match (u.port_u16(), u.host()) {
        (Some(p), Some(host)) if p == default => {
            let path = u.path_and_query().map(|p| p.as_str()).unwrap_or("");
            format!("{}://{host}{path}", u.scheme_str().unwrap_or("https"))
                .parse()
                .unwrap_or(u)
        }
        _ => u,
    }
}

/// `20261122` and `20261122T153000Z`.
fn amz_dates(t: SystemTime) -> (String, String) {
    let dt = time::OffsetDateTime::from(t);
    let date = format!("{:04}{:02}{:02}", dt.year(), dt.month() as u8, dt.day());
    let datetime = format!(
        "{date}T{:02}{:02}{:02}Z",
        dt.hour(),
        dt.minute(),
        dt.second()
    );
    (date, datetime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signing-key derivation and signature from AWS's published SigV4 example
    /// ("GET object" in the S3 API reference, with its example credentials).
    #[test]
    fn sigv4_matches_the_aws_example() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let canonical = "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\nx-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\nx-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n{}",
            hex::encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                canonical.as_bytes()
            ))
        );
        let mac = |k: &[u8], m: &str| {
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, k), m.as_bytes())
                .as_ref()
                .to_vec()
        };
        let k = mac(format!("AWS4{secret}").as_bytes(), "20130524");
        let k = mac(&k, "us-east-1");
        let k = mac(&k, "s3");
        let k = mac(&k, "aws4_request");
        assert_eq!(
            hex::encode(mac(&k, &to_sign)),
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn the_signed_host_is_the_host_header_the_client_sends() {
        let u = |s: &str| without_default_port(s.parse().unwrap()).to_string();
        assert_eq!(u("https://s3.example.test:443"), "https://s3.example.test/");
        assert_eq!(u("http://minio.test:80/"), "http://minio.test/");
        assert_eq!(u("http://[::1]:80"), "http://[::1]/");
        assert_eq!(u("http://minio.test:9000"), "http://minio.test:9000/");
        assert_eq!(
            u("https://s3.example.test:80"),
            "https://s3.example.test:80/"
        );
        assert_eq!(u("https://s3.example.test"), "https://s3.example.test/");
    }

    #[test]
    fn dates_are_formatted_for_sigv4() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_369_353_600);
        assert_eq!(amz_dates(t), ("20130524".into(), "20130524T000000Z".into()));
    }
}
