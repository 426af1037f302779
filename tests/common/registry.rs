//! A fake OCI registry with Docker Hub's token dance, and a fake blob storage host.
//!
//! The registry answers `GET /v2/` with a Bearer challenge, hands out fresh tokens at
//! `/token` (anonymous pulls, like public repositories on Docker Hub), and refuses
//! manifests and blobs without a token for that repository. Blobs are served, streamed
//! slowly, held behind a [`Gate`], corrupted, or redirected to storage, as a test asks.
//! Every request is recorded ([`Recorded`]) with its kind, method, host, status and
//! whether it carried `Authorization`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{
    AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE, USER_AGENT,
    WWW_AUTHENTICATE,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use tokio::sync::watch;

use super::tls::{Body, BoxError, Handler, TestCa, TlsServer};
use super::{query_pairs, sha256_digest, TEST_USER_AGENT};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// What a request to a fake was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `/v2/`
    Base,
    /// The token service.
    Token,
    Manifest,
    Blob,
    /// Blob content at a storage URL (FakeStorage, or the registry's own `/_storage/`).
    Storage,
    Other,
}

/// One request a fake served.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub kind: Kind,
    pub path: String,
    pub query: Option<String>,
    /// `Host` or `:authority`, as sent.
    pub host: String,
    pub authorization: Option<String>,
    pub user_agent: Option<String>,
    pub status: u16,
    /// HTTP/1.1 or HTTP/2, as it came.
    pub version: http::Version,
}

impl Recorded {
    /// Made on behalf of a test client (Stowage forwards the client's `User-Agent`), as
    /// opposed to Stowage's own background requests.
    pub fn by_client(&self) -> bool {
        self.user_agent.as_deref() == Some(TEST_USER_AGENT)
    }
}

fn body_full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn error_body(code: &str, message: &str) -> Bytes {
    Bytes::from(serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string())
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(body_full(body.clone()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    r
}

fn record(log: &Mutex<Vec<Recorded>>, req: &Request<Incoming>, kind: Kind, status: StatusCode) {
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    log.lock().unwrap().push(Recorded {
        method: req.method().clone(),
        kind,
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(str::to_owned),
        host,
        authorization: header(AUTHORIZATION),
        user_agent: header(USER_AGENT),
        status: status.as_u16(),
        version: req.version(),
    });
}

/// Where a blob `GET` is sent in [`BlobMode::Redirect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// `https://storage.test:<port>/blobs/<digest>?sig=...`
    Absolute,
    /// `//storage.test:<port>/blobs/<digest>?sig=...`
    SchemeRelative,
    /// `/_storage/blobs/<digest>?sig=...` on the registry itself.
    PathRelative,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobMode {
    Serve,
    /// `307 Temporary Redirect` to storage.
    Redirect(Location),
}

/// A misbehaviour for `GET`s of one blob (`HEAD`s stay correct); see [`FakeRegistry::set_fault`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Announces the whole `Content-Length`, sends the first `n` bytes, then ends the body.
    Truncate(usize),
    /// Sends the first `n` bytes, then the body fails (HTTP/1.1: the connection is cut;
    /// h2: the stream is reset).
    ResetAfter(usize),
    /// Sends the first `n` bytes, then nothing more, ever (slowloris).
    StallAfter(usize),
    /// Never sends the response head.
    StallHead,
    /// Answers `status` with a registry JSON error (`Retry-After: 1` included).
    Status(u16),
    /// `307` to the same path with a new query, forever.
    RedirectLoop,
    /// `307` to this URL.
    RedirectTo(String),
    /// The right `Content-Length`, but the last `n` bytes inverted.
    FlipTail(usize),
}

/// Holds blob bodies after their first chunk until opened; see [`FakeRegistry::hold_blob_bodies`].
#[derive(Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    pub fn open(&self) {
        self.0.send_replace(true);
    }
}

#[derive(Default)]
struct Repo {
    /// Tag or digest → (bytes, media type).
    manifests: HashMap<String, (Bytes, String)>,
    blobs: HashMap<String, Bytes>,
}

struct RegState {
    repos: HashMap<String, Repo>,
    /// Token → repository it may pull (`None`: only `/v2/`).
    tokens: HashMap<String, Option<String>>,
    mode: BlobMode,
    corrupt: HashSet<String>,
    pace: Pace,
    /// How manifest `GET` bodies are sent (`None`: in one frame); see
    /// [`FakeRegistry::set_manifest_chunking`].
    manifest_pace: Option<Pace>,
    /// Repositories that anonymous tokens cannot read (see [`FakeRegistry::make_private`]).
    private: HashSet<String>,
    /// Token-service accounts: username → (password, private repositories it may pull).
    users: HashMap<String, (String, HashSet<String>)>,
    /// When set, manifest `GET`/`HEAD` with a valid token answer this status instead.
    manifest_failure: Option<StatusCode>,
    /// Digest → fault for its `GET`s (see [`FakeRegistry::set_fault`]).
    faults: HashMap<String, Fault>,
    /// Repository → `Location` of the `302` its manifest and blob requests without any
    /// `Authorization` get (see [`FakeRegistry::redirect_anonymous`]).
    anonymous_redirects: HashMap<String, String>,
    /// In [`BlobMode::Redirect`], redirect `HEAD`s too (as distribution with S3 does).
    redirect_heads: bool,
    /// `ratelimit-limit` and `ratelimit-remaining` on manifest responses, as Docker Hub.
    ratelimit: Option<(u64, u64)>,
}

struct Shared {
    state: Mutex<RegState>,
    log: Mutex<Vec<Recorded>>,
    next_token: AtomicU64,
    realm: String,
    storage: Option<(Arc<StorageShared>, u16)>,
}

/// A built image: digests of everything [`FakeRegistry::push_image`] stored.
#[derive(Clone, Debug)]
pub struct Image {
    pub manifest: String,
    pub manifest_bytes: Bytes,
    pub config: String,
    pub config_bytes: Bytes,
    pub layers: Vec<String>,
}

impl Image {
    /// Config first, then layers: every blob a pull downloads.
    pub fn blobs(&self) -> Vec<String> {
        std::iter::once(self.config.clone())
            .chain(self.layers.iter().cloned())
            .collect()
    }
}

pub struct FakeRegistryBuilder<'a> {
    ca: &'a TestCa,
    realm: Option<String>,
    realm_host: Option<String>,
    host: String,
    storage: Option<&'a FakeStorage>,
    mode: BlobMode,
}

impl<'a> FakeRegistryBuilder<'a> {
    /// The registry's host name (used for the token realm unless `realm_host` is set).
    pub fn host(mut self, host: &str) -> Self {
        self.host = host.to_owned();
        self
    }

    /// Token service host, e.g. `auth.docker.io` for `registry-1.docker.io`. Served by
    /// this same server (same port), as `[upstream.resolve]` keeps the port.
    pub fn realm_host(mut self, host: &str) -> Self {
        self.realm_host = Some(host.to_owned());
        self
    }

    /// The whole token realm URL of the challenge (another server: a token service that
    /// misbehaves), instead of `/token` on this server.
    pub fn realm(mut self, url: &str) -> Self {
        self.realm = Some(url.to_owned());
        self
    }

    /// Blobs pushed from now on are also put into `storage`, for redirects.
    pub fn storage(mut self, storage: &'a FakeStorage) -> Self {
        self.storage = Some(storage);
        self
    }

    pub fn blob_mode(mut self, mode: BlobMode) -> Self {
        self.mode = mode;
        self
    }

    pub async fn build(self) -> FakeRegistry {
        let realm_host = self.realm_host.unwrap_or_else(|| self.host.clone());
        let realm_url = self.realm;
        let storage = self.storage.map(|s| (s.shared.clone(), s.port()));
        let mode = self.mode;
        let mut shared_slot = None;
        let server = TlsServer::start(self.ca.fake_hosts_config(), |addr| {
            let shared = Arc::new(Shared {
                state: Mutex::new(RegState {
                    repos: HashMap::new(),
                    tokens: HashMap::new(),
                    mode,
                    corrupt: HashSet::new(),
                    pace: Pace::plain(),
                    manifest_pace: None,
                    private: HashSet::new(),
                    users: HashMap::new(),
                    manifest_failure: None,
                    faults: HashMap::new(),
                    anonymous_redirects: HashMap::new(),
                    redirect_heads: false,
                    ratelimit: None,
                }),
                log: Mutex::new(Vec::new()),
                next_token: AtomicU64::new(1),
                realm: realm_url
                    .unwrap_or_else(|| format!("https://{realm_host}:{}/token", addr.port())),
                storage,
            });
            shared_slot = Some(shared.clone());
            let handler: Handler = Arc::new(move |req| {
                let shared = shared.clone();
                Box::pin(async move { shared.handle(req).await })
            });
            handler
        })
        .await;
        FakeRegistry {
            shared: shared_slot.expect("handler made"),
            server,
            host: self.host,
        }
    }
}

pub struct FakeRegistry {
    shared: Arc<Shared>,
    server: TlsServer,
    host: String,
}

impl FakeRegistry {
    pub fn builder(ca: &TestCa) -> FakeRegistryBuilder<'_> {
        FakeRegistryBuilder {
            ca,
            realm: None,
            realm_host: None,
            host: "quay.io".into(),
            storage: None,
            mode: BlobMode::Serve,
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn server(&self) -> &TlsServer {
        &self.server
    }

    /// Adds a blob to `repo`; returns its digest.
    pub fn push_blob(&self, repo: &str, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = sha256_digest(&data);
        if let Some((storage, _)) = &self.shared.storage {
            storage
                .blobs
                .lock()
                .unwrap()
                .insert(digest.clone(), data.clone());
        }
        let mut st = self.shared.state.lock().unwrap();
        st.repos
            .entry(repo.to_owned())
            .or_default()
            .blobs
            .insert(digest.clone(), data);
        digest
    }

    /// Adds a manifest under its digest (and `tag`, if given); returns its digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        bytes: impl Into<Bytes>,
        media_type: &str,
    ) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        let mut st = self.shared.state.lock().unwrap();
        let r = st.repos.entry(repo.to_owned()).or_default();
        r.manifests
            .insert(digest.clone(), (bytes.clone(), media_type.to_owned()));
        if let Some(t) = tag {
            r.manifests
                .insert(t.to_owned(), (bytes, media_type.to_owned()));
        }
        digest
    }

    /// Builds and stores an OCI image: a config blob, the layers, and a manifest that
    /// references them with their digests and sizes, tagged `tag`.
    pub fn push_image(&self, repo: &str, tag: &str, layers: &[Vec<u8>]) -> Image {
        let layer_digests: Vec<String> = layers
            .iter()
            .map(|l| self.push_blob(repo, l.clone()))
            .collect();
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": layer_digests},
        });
        let config_bytes = Bytes::from(serde_json::to_vec(&config).unwrap());
        let config_digest = self.push_blob(repo, config_bytes.clone());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_bytes.len()},
            "layers": layers.iter().zip(&layer_digests).map(|(l, d)| serde_json::json!({
                "mediaType": OCI_LAYER, "digest": d, "size": l.len(),
            })).collect::<Vec<_>>(),
        });
        let manifest_bytes = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap());
        let manifest_digest =
            self.push_manifest(repo, Some(tag), manifest_bytes.clone(), OCI_MANIFEST);
        Image {
            manifest: manifest_digest,
            manifest_bytes,
            config: config_digest,
            config_bytes,
            layers: layer_digests,
        }
    }

    /// Serves `digest` with one byte changed (same length) until [`heal`](Self::heal).
    pub fn corrupt_blob(&self, digest: &str) {
        self.shared
            .state
            .lock()
            .unwrap()
            .corrupt
            .insert(digest.to_owned());
    }

    pub fn heal(&self, digest: &str) {
        self.shared.state.lock().unwrap().corrupt.remove(digest);
    }

    /// `GET`s of `digest` misbehave as `fault` says until [`clear_fault`](Self::clear_fault).
    pub fn set_fault(&self, digest: &str, fault: Fault) {
        self.shared
            .state
            .lock()
            .unwrap()
            .faults
            .insert(digest.to_owned(), fault);
    }

    pub fn clear_fault(&self, digest: &str) {
        self.shared.state.lock().unwrap().faults.remove(digest);
    }

    /// Removes a blob from every repository (a load test's misses would grow forever).
    pub fn delete_blob(&self, digest: &str) {
        let mut st = self.shared.state.lock().unwrap();
        for r in st.repos.values_mut() {
            r.blobs.remove(digest);
        }
        if let Some((storage, _)) = &self.shared.storage {
            storage.blobs.lock().unwrap().remove(digest);
        }
    }

    /// Forgets the requests recorded so far (a long load run would grow the log forever).
    pub fn clear_requests(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// Requests answered with `status`.
    pub fn count_status(&self, kind: Kind, status: u16) -> usize {
        self.shared
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.kind == kind && r.status == status)
            .count()
    }

    pub fn set_blob_mode(&self, mode: BlobMode) {
        self.shared.state.lock().unwrap().mode = mode;
    }

    /// In [`BlobMode::Redirect`], blob `HEAD`s get the redirect too (distribution's S3
    /// driver does this), instead of a `200` from the registry.
    /// Sends Docker Hub's `ratelimit-limit` / `ratelimit-remaining` on manifest responses.
    pub fn set_ratelimit(&self, limit: u64, remaining: u64) {
        self.shared.state.lock().unwrap().ratelimit = Some((limit, remaining));
    }

    pub fn redirect_heads(&self) {
        self.shared.state.lock().unwrap().redirect_heads = true;
    }

    /// Blob bodies are sent in `chunk`-byte frames with `pause` between them.
    pub fn set_chunking(&self, chunk: usize, pause: Duration) {
        let mut st = self.shared.state.lock().unwrap();
        st.pace.chunk = chunk.max(1);
        st.pace.pause = pause;
    }

    /// Manifest bodies are sent in `chunk`-byte frames with `pause` between them (a slow
    /// upstream for large manifests, as the load tool's `--slow-manifest-fills`).
    pub fn set_manifest_chunking(&self, chunk: usize, pause: Duration) {
        self.shared.state.lock().unwrap().manifest_pace = Some(Pace {
            chunk: chunk.max(1),
            pause,
            ..Pace::plain()
        });
    }

    /// Blob bodies end `tail` after their last byte.
    pub fn set_tail_delay(&self, tail: Duration) {
        self.shared.state.lock().unwrap().pace.tail = tail;
    }

    /// Blob `GET`s announce no `Content-Length` (HTTP/1.1 sends them chunked), as some
    /// storage hosts and registries do: a proxy learns the size only at the end.
    pub fn send_unsized(&self, unsized_bodies: bool) {
        self.shared.state.lock().unwrap().pace.sized = !unsized_bodies;
    }

    /// From now on, blob bodies send their first chunk and then wait for the gate.
    pub fn hold_blob_bodies(&self) -> Gate {
        let (tx, rx) = watch::channel(false);
        self.shared.state.lock().unwrap().pace.gate = Some(rx);
        Gate(Arc::new(tx))
    }

    /// From now on, tokens for `repo` carry access only for an account (see
    /// [`add_user`](Self::add_user)) that may pull it; anonymous tokens are issued without
    /// access, as Docker Hub does, so requests with them get a 401.
    pub fn make_private(&self, repo: &str) {
        self.shared
            .state
            .lock()
            .unwrap()
            .private
            .insert(repo.to_owned());
    }

    /// A token-service account (HTTP Basic at `/token`) that may pull the private
    /// repositories `repos`. Once any account exists, wrong credentials at `/token` get a 401.
    pub fn add_user(&self, username: &str, password: &str, repos: &[&str]) {
        let repos = repos.iter().map(|r| r.to_string()).collect();
        self.shared
            .state
            .lock()
            .unwrap()
            .users
            .insert(username.to_owned(), (password.to_owned(), repos));
    }

    /// From now on, manifest and blob requests for `repo` that carry no `Authorization`
    /// at all are answered `302 Found` to `location` (an SSO login page, as some
    /// registries behind a corporate login do) instead of the `401` challenge; requests
    /// with a token are served (or refused) as before.
    pub fn redirect_anonymous(&self, repo: &str, location: &str) {
        self.shared
            .state
            .lock()
            .unwrap()
            .anonymous_redirects
            .insert(repo.to_owned(), location.to_owned());
    }

    /// Manifest `GET` and `HEAD` (with a valid token) answer `status` until called with
    /// `None`: 429 comes with `Retry-After`, like Docker Hub's pull limit.
    pub fn fail_manifests(&self, status: Option<StatusCode>) {
        self.shared.state.lock().unwrap().manifest_failure = status;
    }

    /// Forgets every token issued so far, as a registry restarted with a new signing key
    /// would: requests with them get a 401 challenge again.
    pub fn forget_tokens(&self) {
        self.shared.state.lock().unwrap().tokens.clear();
    }

    /// Requests to the token service that carried `Authorization` (as sent).
    pub fn token_authorizations(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.kind == Kind::Token)
            .filter_map(|r| r.authorization)
            .collect()
    }

    /// Every request served, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn count(&self, kind: Kind, method: &Method) -> usize {
        self.shared
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.kind == kind && r.method == method)
            .count()
    }

    pub fn blob_gets(&self) -> usize {
        self.count(Kind::Blob, &Method::GET)
    }

    pub fn blob_heads(&self) -> usize {
        self.count(Kind::Blob, &Method::HEAD)
    }

    pub fn manifest_gets(&self) -> usize {
        self.count(Kind::Manifest, &Method::GET)
    }

    pub fn manifest_heads(&self) -> usize {
        self.count(Kind::Manifest, &Method::HEAD)
    }

    pub fn token_gets(&self) -> usize {
        self.count(Kind::Token, &Method::GET)
    }

    pub fn base_gets(&self) -> usize {
        self.count(Kind::Base, &Method::GET)
    }

    pub fn storage_gets(&self) -> usize {
        self.count(Kind::Storage, &Method::GET)
    }
}

/// `/v2/<name>/<what>/<reference>` → (name, reference).
fn split_repo_path<'p>(path: &'p str, what: &str) -> Option<(&'p str, &'p str)> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, reference) = rest.rsplit_once(&format!("/{what}/"))?;
    if name.is_empty() || reference.is_empty() || reference.contains('/') {
        return None;
    }
    Some((name, reference))
}

fn classify(path: &str) -> Kind {
    if path == "/v2/" || path == "/v2" {
        Kind::Base
    } else if path == "/token" {
        Kind::Token
    } else if path.starts_with("/_storage/") {
        Kind::Storage
    } else if split_repo_path(path, "manifests").is_some() {
        Kind::Manifest
    } else if split_repo_path(path, "blobs").is_some() {
        Kind::Blob
    } else {
        Kind::Other
    }
}

impl Shared {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let kind = classify(&path);
        if kind == Kind::Blob && req.method() == Method::GET && self.stalls_head(req.uri().path()) {
            // Never answers; the connection lives until the fake is dropped.
            std::future::pending::<()>().await;
        }
        let mut resp = match kind {
            Kind::Base => self.base(&req),
            Kind::Token => self.token(&req),
            Kind::Manifest => self.manifest(&req),
            Kind::Blob => self.blob(&req),
            Kind::Storage => self.own_storage(&req),
            Kind::Other => json_response(
                StatusCode::NOT_FOUND,
                error_body("NOT_FOUND", "no such route"),
            ),
        };
        let ratelimit = self.state.lock().unwrap().ratelimit;
        if let (Kind::Manifest, Some((limit, left))) = (kind, ratelimit) {
            let h = resp.headers_mut();
            h.insert(
                "ratelimit-limit",
                format!("{limit};w=21600").parse().unwrap(),
            );
            h.insert(
                "ratelimit-remaining",
                format!("{left};w=21600").parse().unwrap(),
            );
        }
        record(&self.log, &req, kind, resp.status());
        resp
    }

    fn stalls_head(&self, path: &str) -> bool {
        let Some((_, digest)) = split_repo_path(path, "blobs") else {
            return false;
        };
        self.state.lock().unwrap().faults.get(digest) == Some(&Fault::StallHead)
    }

    fn challenge(&self, scope: Option<&str>) -> Response<Body> {
        let mut value = format!("Bearer realm=\"{}\",service=\"fake\"", self.realm);
        if let Some(s) = scope {
            value.push_str(&format!(",scope=\"{s}\""));
        }
        let mut r = json_response(
            StatusCode::UNAUTHORIZED,
            error_body("UNAUTHORIZED", "authentication required"),
        );
        r.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_str(&value).unwrap());
        r
    }

    fn bearer(req: &Request<Incoming>) -> Option<String> {
        let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
        v.strip_prefix("Bearer ").map(str::to_owned)
    }

    fn base(&self, req: &Request<Incoming>) -> Response<Body> {
        let st = self.state.lock().unwrap();
        match Self::bearer(req) {
            Some(t) if st.tokens.contains_key(&t) => {
                json_response(StatusCode::OK, Bytes::from_static(b"{}"))
            }
            _ => self.challenge(None),
        }
    }

    fn token(&self, req: &Request<Incoming>) -> Response<Body> {
        let pairs = query_pairs(req.uri().query().unwrap_or(""));
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        if get("service").as_deref() != Some("fake") {
            return json_response(
                StatusCode::BAD_REQUEST,
                error_body("UNSUPPORTED", "unknown service"),
            );
        }
        let repo = match get("scope") {
            None => None,
            Some(scope) => {
                // repository:<name>:pull[,push]
                let Some(rest) = scope.strip_prefix("repository:") else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        error_body("UNSUPPORTED", "bad scope"),
                    );
                };
                let Some((name, actions)) = rest.rsplit_once(':') else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        error_body("UNSUPPORTED", "bad scope"),
                    );
                };
                if !actions.split(',').any(|a| a == "pull") {
                    return json_response(StatusCode::FORBIDDEN, error_body("DENIED", "pull only"));
                }
                Some(name.to_owned())
            }
        };
        let repo = {
            let st = self.state.lock().unwrap();
            // Accounts are checked only once a test added one (`add_user`).
            let account = if st.users.is_empty() {
                None
            } else {
                match basic_credentials(req) {
                    None => None,
                    Some((user, password)) => match st.users.get(&user) {
                        Some((pw, repos)) if *pw == password => Some(repos.clone()),
                        _ => {
                            return json_response(
                                StatusCode::UNAUTHORIZED,
                                error_body("UNAUTHORIZED", "incorrect username or password"),
                            )
                        }
                    },
                }
            };
            match repo {
                Some(r)
                    if st.private.contains(&r)
                        && !account.as_ref().is_some_and(|a| a.contains(&r)) =>
                {
                    None
                }
                other => other,
            }
        };
        let n = self.next_token.fetch_add(1, Ordering::SeqCst);
        let token = format!(
            "tok{n}-{}",
            // Each registry signs its own tokens: one issued by another fake (another port)
            // is no good here, as with real registries.
            &sha256_digest(format!("{}{n}{repo:?}", self.realm).as_bytes())[7..23]
        );
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(token.clone(), repo);
        let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300, "issued_at": "2024-01-01T00:00:00Z"});
        json_response(StatusCode::OK, Bytes::from(body.to_string()))
    }

    /// The 401 to send when the request has no token for `repo` (or the `302` of
    /// [`FakeRegistry::redirect_anonymous`] when it has no `Authorization` at all).
    fn refusal(&self, req: &Request<Incoming>, repo: &str) -> Option<Response<Body>> {
        let st = self.state.lock().unwrap();
        if !req.headers().contains_key(AUTHORIZATION) {
            if let Some(location) = st.anonymous_redirects.get(repo) {
                let mut r = Response::new(body_full(Bytes::new()));
                *r.status_mut() = StatusCode::FOUND;
                r.headers_mut()
                    .insert(LOCATION, HeaderValue::from_str(location).unwrap());
                r.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(0));
                return Some(r);
            }
        }
        match Self::bearer(req).and_then(|t| st.tokens.get(&t).cloned()) {
            Some(Some(r)) if r == repo => None,
            _ => Some(self.challenge(Some(&format!("repository:{repo}:pull")))),
        }
    }

    fn manifest(&self, req: &Request<Incoming>) -> Response<Body> {
        let (repo, reference) = split_repo_path(req.uri().path(), "manifests").expect("classified");
        if let Some(r) = self.refusal(req, repo) {
            return r;
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                error_body("UNSUPPORTED", "read only"),
            );
        }
        let failure = self.state.lock().unwrap().manifest_failure;
        if let Some(status) = failure {
            let code = if status == StatusCode::TOO_MANY_REQUESTS {
                "TOOMANYREQUESTS"
            } else {
                "UNAVAILABLE"
            };
            let mut r = json_response(status, error_body(code, "forced failure"));
            if status == StatusCode::TOO_MANY_REQUESTS {
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            return r;
        }
        let found = self
            .state
            .lock()
            .unwrap()
            .repos
            .get(repo)
            .and_then(|r| r.manifests.get(reference).cloned());
        let Some((bytes, media_type)) = found else {
            return json_response(
                StatusCode::NOT_FOUND,
                error_body("MANIFEST_UNKNOWN", "manifest unknown"),
            );
        };
        let digest = sha256_digest(&bytes);
        let len = bytes.len();
        let pace = self.state.lock().unwrap().manifest_pace.clone();
        let mut r = Response::new(match pace {
            _ if req.method() == Method::HEAD => body_full(Bytes::new()),
            Some(pace) => paced_body(bytes, pace),
            None => body_full(bytes),
        });
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(&media_type).unwrap());
        h.insert(CONTENT_LENGTH, HeaderValue::from(len));
        h.insert(
            "docker-content-digest",
            HeaderValue::from_str(&digest).unwrap(),
        );
        r
    }

    fn blob(&self, req: &Request<Incoming>) -> Response<Body> {
        let (repo, digest) = split_repo_path(req.uri().path(), "blobs").expect("classified");
        if let Some(r) = self.refusal(req, repo) {
            return r;
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                error_body("UNSUPPORTED", "read only"),
            );
        }
        let st = self.state.lock().unwrap();
        let Some(data) = st
            .repos
            .get(repo)
            .and_then(|r| r.blobs.get(digest))
            .cloned()
        else {
            return json_response(
                StatusCode::NOT_FOUND,
                error_body("BLOB_UNKNOWN", "blob unknown to registry"),
            );
        };
        let redirected = st.redirect_heads && matches!(st.mode, BlobMode::Redirect(_));
        if req.method() == Method::HEAD && !redirected {
            return blob_head(&data, digest);
        }
        if let Some(fault) = st.faults.get(digest).cloned() {
            return faulty_blob(data, digest, &fault, req.uri().path(), req.uri().query());
        }
        if let BlobMode::Redirect(loc) = st.mode {
            let sig = &sha256_digest(format!("sig{digest}").as_bytes())[7..31];
            let storage_port = self.storage.as_ref().map(|(_, p)| *p);
            let location = match (loc, storage_port) {
                (Location::Absolute, Some(p)) => {
                    format!("https://storage.test:{p}/blobs/{digest}?sig={sig}")
                }
                (Location::SchemeRelative, Some(p)) => {
                    format!("//storage.test:{p}/blobs/{digest}?sig={sig}")
                }
                (Location::PathRelative, _) => format!("/_storage/blobs/{digest}?sig={sig}"),
                (_, None) => panic!("FakeRegistry: redirect to storage.test needs .storage(..)"),
            };
            let mut r = Response::new(body_full(Bytes::new()));
            *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            r.headers_mut()
                .insert(LOCATION, HeaderValue::from_str(&location).unwrap());
            r.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(0));
            return r;
        }
        let data = if st.corrupt.contains(digest) {
            corrupted(&data)
        } else {
            data
        };
        blob_get(data, digest, st.pace.clone())
    }

    /// The registry's own storage path, reached through a path-relative redirect.
    fn own_storage(&self, req: &Request<Incoming>) -> Response<Body> {
        let Some(digest) = req.uri().path().strip_prefix("/_storage/blobs/") else {
            return json_response(
                StatusCode::NOT_FOUND,
                error_body("NOT_FOUND", "no such object"),
            );
        };
        if !req.uri().query().unwrap_or("").contains("sig=") {
            return json_response(StatusCode::FORBIDDEN, error_body("DENIED", "unsigned"));
        }
        let st = self.state.lock().unwrap();
        let data = st.repos.values().find_map(|r| r.blobs.get(digest)).cloned();
        match data {
            Some(d) => blob_get(
                d,
                digest,
                Pace {
                    gate: None,
                    ..st.pace.clone()
                },
            ),
            None => json_response(
                StatusCode::NOT_FOUND,
                error_body("NOT_FOUND", "no such object"),
            ),
        }
    }
}

/// `(user, password)` from `Authorization: Basic`.
fn basic_credentials(req: &Request<Incoming>) -> Option<(String, String)> {
    use base64::Engine;
    let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let encoded = v.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The same length, one byte different (in the middle, so it is not the last byte sent).
fn corrupted(data: &Bytes) -> Bytes {
    let mut v = data.to_vec();
    if !v.is_empty() {
        let i = v.len() / 2;
        v[i] ^= 0xff;
    }
    Bytes::from(v)
}

/// A blob `GET` answered as `fault` says.
fn faulty_blob(
    data: Bytes,
    digest: &str,
    fault: &Fault,
    path: &str,
    query: Option<&str>,
) -> Response<Body> {
    let redirect = |location: String| {
        let mut r = Response::new(body_full(Bytes::new()));
        *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        r.headers_mut()
            .insert(LOCATION, HeaderValue::from_str(&location).unwrap());
        r.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(0));
        r
    };
    let (n, end): (usize, &'static str) = match fault {
        Fault::Truncate(n) => (*n, "end"),
        Fault::ResetAfter(n) => (*n, "error"),
        Fault::StallAfter(n) => (*n, "stall"),
        Fault::StallHead => unreachable!("handled before the handler runs"),
        Fault::Status(code) => {
            let status = StatusCode::from_u16(*code).expect("valid status");
            let code = if *code == 429 {
                "TOOMANYREQUESTS"
            } else {
                "UNAVAILABLE"
            };
            let mut r = json_response(status, error_body(code, "injected fault"));
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        Fault::RedirectLoop => {
            let hop: u64 = query
                .and_then(|q| q.strip_prefix("hop="))
                .and_then(|h| h.parse().ok())
                .unwrap_or(0);
            return redirect(format!("{path}?hop={}", hop + 1));
        }
        Fault::RedirectTo(url) => return redirect(url.clone()),
        Fault::FlipTail(n) => {
            let mut v = data.to_vec();
            let from = v.len().saturating_sub(*n);
            v[from..].iter_mut().for_each(|b| *b = !*b);
            return blob_get(Bytes::from(v), digest, Pace::plain());
        }
    };
    let len = data.len();
    let head = data.slice(..n.min(len));
    let tail = futures_util::stream::once(async move {
        match end {
            "end" => None,
            "error" => Some(Err::<Frame<Bytes>, BoxError>("injected reset".into())),
            _ => {
                std::future::pending::<()>().await;
                None
            }
        }
    })
    .filter_map(|x| async move { x });
    let stream =
        futures_util::stream::once(async move { Ok::<_, BoxError>(Frame::data(head)) }).chain(tail);
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        "docker-content-digest",
        HeaderValue::from_str(digest).unwrap(),
    );
    r
}

fn blob_head(data: &Bytes, digest: &str) -> Response<Body> {
    let mut r = Response::new(body_full(Bytes::new()));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(CONTENT_LENGTH, HeaderValue::from(data.len()));
    h.insert(
        "docker-content-digest",
        HeaderValue::from_str(digest).unwrap(),
    );
    r
}

/// How a blob body is sent: `chunk`-byte frames, `pause` between them, the first chunk
/// at once and the rest after `gate` opens, and `tail` between the last byte and the end
/// of the stream (over h2 the end is a frame of its own, so a proxy sees every byte well
/// before it learns that the body is over).
#[derive(Clone)]
struct Pace {
    chunk: usize,
    pause: Duration,
    tail: Duration,
    gate: Option<watch::Receiver<bool>>,
    /// Whether `Content-Length` is sent.
    sized: bool,
}

impl Pace {
    fn plain() -> Pace {
        Pace {
            chunk: 64 * 1024,
            pause: Duration::ZERO,
            tail: Duration::ZERO,
            gate: None,
            sized: true,
        }
    }
}

fn blob_get(data: Bytes, digest: &str, pace: Pace) -> Response<Body> {
    let len = data.len();
    let sized = pace.sized;
    let mut r = Response::new(paced_body(data, pace));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if sized {
        h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    h.insert(
        "docker-content-digest",
        HeaderValue::from_str(digest).unwrap(),
    );
    r
}

/// `data` as a body sent the way `pace` says.
fn paced_body(data: Bytes, pace: Pace) -> Body {
    let stream = futures_util::stream::unfold(
        (data, 0usize, pace),
        move |(data, pos, mut pace)| async move {
            if pos >= data.len() {
                if !pace.tail.is_zero() {
                    tokio::time::sleep(pace.tail).await;
                }
                return None;
            }
            if pos > 0 {
                if let Some(g) = pace.gate.as_mut() {
                    let _ = g.wait_for(|open| *open).await;
                }
                if !pace.pause.is_zero() {
                    tokio::time::sleep(pace.pause).await;
                }
            }
            let end = (pos + pace.chunk).min(data.len());
            let frame = Frame::data(data.slice(pos..end));
            Some((Ok::<_, BoxError>(frame), (data, end, pace)))
        },
    );
    StreamBody::new(stream).boxed_unsync()
}

pub struct StorageShared {
    blobs: Mutex<HashMap<String, Bytes>>,
    log: Mutex<Vec<Recorded>>,
    faults: Mutex<HashMap<String, Fault>>,
}

/// A blob storage host (`storage.test`, like S3 behind a presigned URL): serves
/// `/blobs/<digest>?sig=...` without any `Authorization` and records whether one came.
pub struct FakeStorage {
    shared: Arc<StorageShared>,
    server: TlsServer,
}

impl FakeStorage {
    pub async fn start(ca: &TestCa) -> FakeStorage {
        let shared = Arc::new(StorageShared {
            blobs: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            faults: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let server = TlsServer::start(ca.fake_hosts_config(), move |_| {
            let handler: Handler = Arc::new(move |req| {
                let s = s.clone();
                Box::pin(async move { s.handle(req) })
            });
            handler
        })
        .await;
        FakeStorage { shared, server }
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn put(&self, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = sha256_digest(&data);
        self.shared
            .blobs
            .lock()
            .unwrap()
            .insert(digest.clone(), data);
        digest
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Signed `GET`s of `digest` misbehave as `fault` says (`StallHead` and `Status` are
    /// not offered here) until [`clear_fault`](Self::clear_fault).
    pub fn set_fault(&self, digest: &str, fault: Fault) {
        assert!(!matches!(fault, Fault::StallHead | Fault::Status(_)));
        self.shared
            .faults
            .lock()
            .unwrap()
            .insert(digest.to_owned(), fault);
    }

    pub fn clear_fault(&self, digest: &str) {
        self.shared.faults.lock().unwrap().remove(digest);
    }

    /// Requests answered with `status`.
    pub fn count_status(&self, status: u16) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.status == status)
            .count()
    }

    pub fn gets(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == Method::GET)
            .count()
    }

    /// Whether any request carried an `Authorization` header.
    pub fn saw_authorization(&self) -> bool {
        self.requests().iter().any(|r| r.authorization.is_some())
    }
}

impl StorageShared {
    fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let resp = (|| {
            let Some(digest) = req.uri().path().strip_prefix("/blobs/") else {
                return json_response(
                    StatusCode::NOT_FOUND,
                    error_body("NoSuchKey", "no such object"),
                );
            };
            if !req.uri().query().unwrap_or("").contains("sig=") {
                return json_response(
                    StatusCode::FORBIDDEN,
                    error_body("AccessDenied", "unsigned request"),
                );
            }
            let Some(data) = self.blobs.lock().unwrap().get(digest).cloned() else {
                return json_response(
                    StatusCode::NOT_FOUND,
                    error_body("NoSuchKey", "no such object"),
                );
            };
            let fault = self.faults.lock().unwrap().get(digest).cloned();
            match (req.method(), fault) {
                (&Method::HEAD, _) => blob_head(&data, digest),
                (&Method::GET, Some(f)) => {
                    faulty_blob(data, digest, &f, req.uri().path(), req.uri().query())
                }
                // The one range clients of storage ask for here: the first byte (as S3 does).
                (&Method::GET, None)
                    if req.headers().get(RANGE).is_some_and(|r| r == "bytes=0-0") =>
                {
                    let mut r = Response::new(body_full(data.slice(..1.min(data.len()))));
                    *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                    let range = format!("bytes 0-0/{}", data.len());
                    r.headers_mut()
                        .insert(CONTENT_RANGE, HeaderValue::from_str(&range).unwrap());
                    r.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(1));
                    r
                }
                (&Method::GET, None) => blob_get(data, digest, Pace::plain()),
                _ => json_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    error_body("MethodNotAllowed", "read only"),
                ),
            }
        })();
        record(&self.log, &req, Kind::Storage, resp.status());
        resp
    }
}
