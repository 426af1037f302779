//! The registry API in-process (issue 13, item 6): `RegistryApi::serve` driven against a
//! fake upstream behind `upstream::Transport`, with no sockets, TLS or listeners.
//!
//! Each case builds a fresh API over a temporary cache and a [`Fake`] that holds any number
//! of registries keyed by their whole identity (scheme, host, port), so two registries under
//! one name on two ports, or over `http://` and `https://`, differ. The fake records every
//! request it answers; cases assert the exact upstream traffic (`"HEAD blob team/private anon
//! 401"`), statuses, headers and bytes for the request-path rules: who may read cached
//! content, tag freshness and revalidation, stale answers while upstream fails, offline
//! mode, and upstream errors. Every request is followed by [`Harness::settle`], which waits
//! for the background work it started (fills, the public-repository probe), so the recorded
//! traffic is deterministic.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HOST, LOCATION,
    RETRY_AFTER, WARNING, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use stowage::access::Access;
use stowage::cache::{BlobStore, Cache, Limits};
use stowage::http_util::{empty, full, Body, BoxError};
use stowage::oci::{Algorithm, Digest, Registry, RepoKey, TagKey};
use stowage::registry_api::pass_through::PLACEHOLDER_TOKEN;
use stowage::registry_api::{Accounts, RegistryApi, RepoFilter, Rules, TagTtl, Target};
use stowage::settings::{AuthCheck, Credentials, UpstreamConfig};
use stowage::telemetry::Metrics;
use stowage::upstream::token_auth::Account;
use stowage::upstream::{Offline, Transport, Upstream};

/// `Basic alice:secret`: the one credential private repositories accept.
const ALICE: &str = "Basic YWxpY2U6c2VjcmV0";
/// `Basic bob:wrong`: a credential upstream refuses.
const BOB: &str = "Basic Ym9iOndyb25n";
/// `Basic carol:x`: public repositories serve it (they ignore credentials); nothing grants it.
const CAROL: &str = "Basic Y2Fyb2w6eA==";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Where SSO-protected repositories send anonymous clients.
const LOGIN_HOST: &str = "login.example.com";
const LOGIN_PAGE: &str = "<html><body>Sign in to continue</body></html>";

fn reg(s: &str) -> Registry {
    s.parse().expect("registry")
}

fn repo_key(s: &str) -> RepoKey {
    s.parse().expect("registry/repository")
}

fn tag_key(s: &str) -> TagKey {
    s.parse().expect("registry/repository:tag")
}

fn sha256(bytes: &[u8]) -> Digest {
    Digest::from_bytes(
        Algorithm::Sha256,
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref(),
    )
}

// ---------------------------------------------------------------------------------------
// The fake upstream
// ---------------------------------------------------------------------------------------

/// What a request to the fake addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Base,
    Manifest,
    Blob,
    /// The SSO login page at [`LOGIN_HOST`].
    Login,
    Other,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Base => "base",
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
            Kind::Login => "login",
            Kind::Other => "other",
        }
    }
}

/// Who may read a fake repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Visibility {
    /// Anyone, whatever credentials they send.
    Public,
    /// Alice only; anyone else gets `401` with a Basic challenge.
    Private,
    /// Alice only; anonymous requests get a `302` to a login page (an SSO front end),
    /// other credentials `401`.
    Sso,
}

/// A registry that is failing: every request to it gets this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Status(u16),
    /// The connection fails (the transport returns an error).
    Unreachable,
}

/// One request the fake answered.
#[derive(Clone, Debug)]
struct Seen {
    registry: Registry,
    method: Method,
    kind: Kind,
    repo: String,
    authorization: Option<String>,
    /// `None`: the transport failed.
    status: Option<u16>,
}

impl Seen {
    /// `"HEAD blob team/private anon 401"`.
    fn summary(&self) -> String {
        let who = match self.authorization.as_deref() {
            None => "anon",
            Some(ALICE) => "alice",
            Some(BOB) => "bob",
            Some(CAROL) => "carol",
            Some(_) => "other",
        };
        let status = self
            .status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "err".into());
        let repo = if self.repo.is_empty() {
            "-"
        } else {
            &self.repo
        };
        format!(
            "{} {} {repo} {who} {status}",
            self.method,
            self.kind.as_str()
        )
    }
}

struct FakeRepo {
    visibility: Visibility,
    /// Tag → manifest digests, one per media type (the `Accept` header picks one).
    tags: HashMap<String, Vec<Digest>>,
    /// Digest → (media type, bytes). The bytes need not hash to the digest.
    manifests: HashMap<Digest, (String, Bytes)>,
    /// Digest → bytes, for this repository only. The bytes need not hash to the digest.
    blobs: HashMap<Digest, Bytes>,
}

#[derive(Default)]
struct FakeRegistry {
    repos: HashMap<String, FakeRepo>,
    failure: Option<Failure>,
}

#[derive(Default)]
struct State {
    registries: HashMap<Registry, FakeRegistry>,
    seen: Vec<Seen>,
    /// When set, blob bodies send their first chunk, then wait for this to turn true.
    hold: Option<watch::Receiver<bool>>,
    /// The same for manifest bodies.
    hold_manifests: Option<watch::Receiver<bool>>,
    /// How long every `HEAD` answer takes to arrive.
    head_delay: Duration,
    /// Rate-limit headers on every manifest answer: (limit, remaining, window seconds).
    ratelimit: Option<(u64, u64, u64)>,
}

/// An in-process upstream: any number of registries, each a map of repositories.
#[derive(Clone, Default)]
struct Fake(Arc<Mutex<State>>);

/// `bytes` in three chunks (so that streaming and held-back last frames are exercised);
/// with `hold`, the chunks after the first wait for it to turn true.
fn held_body(bytes: Bytes, hold: Option<watch::Receiver<bool>>) -> Body {
    let third = bytes.len().div_ceil(3).max(1);
    let chunks: Vec<Bytes> = bytes.chunks(third).map(Bytes::copy_from_slice).collect();
    let stream = futures_util::stream::unfold(
        (chunks.into_iter(), hold, true),
        |(mut it, mut hold, first)| async move {
            let chunk = it.next()?;
            if !first {
                if let Some(h) = hold.as_mut() {
                    let _ = h.wait_for(|open| *open).await;
                }
            }
            Some((Ok::<_, BoxError>(Frame::data(chunk)), (it, hold, false)))
        },
    );
    StreamBody::new(stream).boxed_unsync()
}

fn registry_json(status: StatusCode, code: &str) -> Response<Body> {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"fake"}}]}}"#);
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `/v2/<name>/blobs/<ref>` etc., as the fake understands them.
fn split_path(path: &str) -> (Kind, String, String) {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return (Kind::Other, String::new(), String::new());
    };
    if rest.is_empty() {
        return (Kind::Base, String::new(), String::new());
    }
    for (marker, kind) in [("/blobs/", Kind::Blob), ("/manifests/", Kind::Manifest)] {
        if let Some((name, reference)) = rest.rsplit_once(marker) {
            return (kind, name.to_owned(), reference.to_owned());
        }
    }
    (Kind::Other, String::new(), String::new())
}

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("fake lock")
    }

    /// Creates (or changes the visibility of) `repo` on `registry`.
    fn repo(&self, registry: &str, repo: &str, visibility: Visibility) {
        let mut st = self.state();
        let r = st.registries.entry(reg(registry)).or_default();
        r.repos
            .entry(repo.to_owned())
            .or_insert_with(|| FakeRepo {
                visibility,
                tags: HashMap::new(),
                manifests: HashMap::new(),
                blobs: HashMap::new(),
            })
            .visibility = visibility;
    }

    fn with_repo<T>(&self, registry: &str, repo: &str, f: impl FnOnce(&mut FakeRepo) -> T) -> T {
        let mut st = self.state();
        let r = st
            .registries
            .get_mut(&reg(registry))
            .and_then(|r| r.repos.get_mut(repo))
            .unwrap_or_else(|| panic!("create {registry}/{repo} first"));
        f(r)
    }

    /// Pushes a blob; returns its digest.
    fn blob(&self, registry: &str, repo: &str, bytes: &[u8]) -> Digest {
        let d = sha256(bytes);
        self.blob_as(registry, repo, &d, bytes);
        d
    }

    /// Puts `bytes` under `digest`, whether or not they hash to it.
    fn blob_as(&self, registry: &str, repo: &str, digest: &Digest, bytes: &[u8]) {
        self.with_repo(registry, repo, |r| {
            r.blobs
                .insert(digest.clone(), Bytes::copy_from_slice(bytes))
        });
    }

    /// Pushes a manifest (and points `tag` at it for its media type); returns its digest.
    fn manifest(
        &self,
        registry: &str,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: &[u8],
    ) -> Digest {
        let d = sha256(bytes);
        self.manifest_as(registry, repo, tag, &d, media_type, bytes);
        d
    }

    /// Puts a manifest under `digest`, whether or not its bytes hash to it.
    fn manifest_as(
        &self,
        registry: &str,
        repo: &str,
        tag: Option<&str>,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
    ) {
        self.with_repo(registry, repo, |r| {
            r.manifests.insert(
                digest.clone(),
                (media_type.to_owned(), Bytes::copy_from_slice(bytes)),
            );
            if let Some(tag) = tag {
                let variants = r.tags.entry(tag.to_owned()).or_default();
                let manifests = &r.manifests;
                variants.retain(|v| manifests.get(v).is_none_or(|(m, _)| m != media_type));
                variants.push(digest.clone());
            }
        });
    }

    fn untag(&self, registry: &str, repo: &str, tag: &str) {
        self.with_repo(registry, repo, |r| r.tags.remove(tag));
    }

    /// A one-layer image: its layer blob, and a manifest naming it, tagged `tag`.
    fn image(&self, registry: &str, repo: &str, tag: &str, seed: &str) -> Image {
        let layer = Bytes::from(format!("layer of {seed} at {registry}/{repo}\n").repeat(40));
        let layer_digest = self.blob(registry, repo, &layer);
        let manifest = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}],"annotations":{{"seed":"{seed}"}}}}"#,
            layer.len()
        ));
        let digest = self.manifest(registry, repo, Some(tag), OCI_MANIFEST, &manifest);
        Image {
            manifest,
            digest,
            layer,
            layer_digest,
        }
    }

    fn fail(&self, registry: &str, failure: Option<Failure>) {
        self.state()
            .registries
            .entry(reg(registry))
            .or_default()
            .failure = failure;
    }

    /// Makes blob bodies wait after their first chunk until the returned sender says `true`.
    fn hold_blobs(&self) -> watch::Sender<bool> {
        let (tx, rx) = watch::channel(false);
        self.state().hold = Some(rx);
        tx
    }

    /// Makes manifest bodies wait after their first chunk until the returned sender says
    /// `true`.
    fn hold_manifests(&self) -> watch::Sender<bool> {
        let (tx, rx) = watch::channel(false);
        self.state().hold_manifests = Some(rx);
        tx
    }

    /// A position in the request log, for [`Fake::since`].
    fn mark(&self) -> usize {
        self.state().seen.len()
    }

    /// Requests answered since `mark`, as summaries (every registry).
    fn since(&self, mark: usize) -> Vec<String> {
        self.state().seen[mark..]
            .iter()
            .map(Seen::summary)
            .collect()
    }

    /// Requests to `registry` since `mark`, as summaries.
    fn since_at(&self, mark: usize, registry: &str) -> Vec<String> {
        let r = reg(registry);
        self.state().seen[mark..]
            .iter()
            .filter(|s| s.registry == r)
            .map(Seen::summary)
            .collect()
    }

    fn answer(&self, req: &Request<Body>) -> Result<Response<Body>, BoxError> {
        let mut st = self.state();
        let registry = Registry::of_uri(req.uri()).ok_or("the fake needs absolute URIs")?;
        let (mut kind, repo, reference) = split_path(req.uri().path());
        if registry.host().as_str() == LOGIN_HOST {
            kind = Kind::Login;
        }
        let authorization = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let result = st.respond(
            &registry,
            req.method(),
            kind,
            &repo,
            &reference,
            authorization.as_deref(),
            req.headers(),
        );
        st.seen.push(Seen {
            registry,
            method: req.method().clone(),
            kind,
            repo,
            authorization,
            status: result.as_ref().ok().map(|r| r.status().as_u16()),
        });
        result
    }
}

impl State {
    #[allow(clippy::too_many_arguments)]
    fn respond(
        &self,
        registry: &Registry,
        method: &Method,
        kind: Kind,
        repo: &str,
        reference: &str,
        authorization: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Response<Body>, BoxError> {
        let head = method == Method::HEAD;
        let content = |status: StatusCode, media_type: &str, bytes: Bytes, body: Body| {
            let mut r = Response::new(if head { empty() } else { body });
            *r.status_mut() = status;
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_str(media_type).unwrap());
            h.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            r
        };
        if kind == Kind::Login {
            let page = Bytes::from_static(LOGIN_PAGE.as_bytes());
            return Ok(content(
                StatusCode::OK,
                "text/html; charset=utf-8",
                page.clone(),
                full(page),
            ));
        }
        let Some(fake) = self.registries.get(registry) else {
            return Err(format!("{registry}: no such host").into());
        };
        match fake.failure {
            Some(Failure::Unreachable) => return Err("connection refused".into()),
            Some(Failure::Status(s)) => {
                let status = StatusCode::from_u16(s).unwrap();
                let mut r = registry_json(status, "UNAVAILABLE");
                if s == 429 {
                    r.headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from_static("7"));
                }
                return Ok(r);
            }
            None => {}
        }
        match kind {
            Kind::Base => return Ok(registry_json(StatusCode::OK, "NONE")),
            Kind::Other | Kind::Login => {
                return Ok(registry_json(StatusCode::NOT_FOUND, "UNSUPPORTED"))
            }
            Kind::Manifest | Kind::Blob => {}
        }
        let Some(r) = fake.repos.get(repo) else {
            return Ok(registry_json(StatusCode::NOT_FOUND, "NAME_UNKNOWN"));
        };
        match (r.visibility, authorization) {
            (Visibility::Public, _) => {}
            (Visibility::Private | Visibility::Sso, Some(ALICE)) => {}
            (Visibility::Sso, None) => {
                let mut resp = Response::new(empty());
                *resp.status_mut() = StatusCode::FOUND;
                resp.headers_mut().insert(
                    LOCATION,
                    HeaderValue::from_str(&format!("https://{LOGIN_HOST}/sso?from={repo}"))
                        .unwrap(),
                );
                return Ok(resp);
            }
            _ => {
                let mut resp = registry_json(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
                resp.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Basic realm="fake registry""#),
                );
                return Ok(resp);
            }
        }
        if kind == Kind::Manifest {
            let digest = match reference.parse::<Digest>() {
                Ok(d) => Some(d),
                Err(_) => {
                    let accept: Vec<&str> = headers
                        .get_all(ACCEPT)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    let accept = accept.join(",");
                    r.tags.get(reference).and_then(|variants| {
                        variants
                            .iter()
                            .find(|d| r.manifests.get(d).is_some_and(|(m, _)| accept.contains(m)))
                            .or(variants.first())
                            .cloned()
                    })
                }
            };
            let Some((digest, (media_type, bytes))) =
                digest.and_then(|d| r.manifests.get(&d).map(|m| (d, m.clone())))
            else {
                return Ok(registry_json(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"));
            };
            let body = held_body(bytes.clone(), self.hold_manifests.clone());
            let mut resp = content(StatusCode::OK, &media_type, bytes, body);
            if let Some((limit, remaining, w)) = self.ratelimit {
                let h = resp.headers_mut();
                h.insert(
                    "ratelimit-limit",
                    HeaderValue::from_str(&format!("{limit};w={w}")).unwrap(),
                );
                h.insert(
                    "ratelimit-remaining",
                    HeaderValue::from_str(&format!("{remaining};w={w}")).unwrap(),
                );
            }
            resp.headers_mut().insert(
                "docker-content-digest",
                HeaderValue::from_str(&digest.to_string()).unwrap(),
            );
            return Ok(resp);
        }
        let Some((digest, bytes)) = reference
            .parse::<Digest>()
            .ok()
            .and_then(|d| r.blobs.get(&d).map(|b| (d, b.clone())))
        else {
            return Ok(registry_json(StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));
        };
        let body = held_body(bytes.clone(), self.hold.clone());
        let mut resp = content(StatusCode::OK, "application/octet-stream", bytes, body);
        resp.headers_mut().insert(
            "docker-content-digest",
            HeaderValue::from_str(&digest.to_string()).unwrap(),
        );
        Ok(resp)
    }
}

impl Transport for Fake {
    fn send(
        &self,
        req: Request<Body>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>> {
        let answer = self.answer(&req);
        let delay = if req.method() == Method::HEAD {
            self.state().head_delay
        } else {
            Duration::ZERO
        };
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            answer
        })
    }
}

struct Image {
    manifest: Bytes,
    digest: Digest,
    layer: Bytes,
    layer_digest: Digest,
}

// ---------------------------------------------------------------------------------------
// The harness: one RegistryApi over a temporary cache and the fake
// ---------------------------------------------------------------------------------------

struct Opts {
    offline: bool,
    tag_ttl: Duration,
    auth_ttl: Duration,
    public_ttl: Duration,
    /// Configured upstream accounts, by registry.
    accounts: Vec<(&'static str, Credentials)>,
    /// Configured auth hosts: (auth host, the registry that names it).
    auth_hosts: Vec<(&'static str, &'static str)>,
    /// `[cache] negative_ttl`.
    negative_ttl: Duration,
    /// `[upstream] quota_reserve` as a share.
    quota_reserve: f64,
    /// Repository filters: (registry, allow, deny).
    filters: Vec<(
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    )>,
    max_concurrent_fills: usize,
    /// `[cache] max_manifest_size`.
    max_manifest_size: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            offline: false,
            tag_ttl: Duration::from_secs(3600),
            auth_ttl: Duration::from_secs(300),
            public_ttl: Duration::from_secs(3600),
            accounts: Vec::new(),
            auth_hosts: Vec::new(),
            negative_ttl: Duration::ZERO,
            quota_reserve: 0.1,
            filters: Vec::new(),
            max_concurrent_fills: 16,
            max_manifest_size: 1 << 20,
        }
    }
}

impl Opts {
    /// Tags are stale at once: every tag request after the first revalidates.
    fn stale_tags() -> Opts {
        Opts {
            tag_ttl: Duration::ZERO,
            ..Opts::default()
        }
    }
}

struct Harness {
    api: Arc<RegistryApi>,
    fake: Fake,
    dir: tempfile::TempDir,
}

/// What a client got: status, headers, the bytes that arrived, and how the body ended.
#[derive(Debug)]
struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// The body ended in an error after `body`.
    error: Option<String>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("(none)")
    }

    /// A complete `200` with exactly `bytes`.
    #[track_caller]
    fn assert_ok(&self, bytes: &[u8], x_cache: &str) {
        assert_eq!(self.status, StatusCode::OK, "{self:?}");
        assert_eq!(self.error, None, "{self:?}");
        assert_eq!(self.body, bytes, "wrong content");
        assert_eq!(self.x_cache(), x_cache, "{self:?}");
    }

    /// Refused with `status`, and none of `secret` in the answer.
    #[track_caller]
    fn assert_refused(&self, status: u16, secret: &[u8]) {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        assert!(
            !self.body.windows(secret.len()).any(|w| w == secret),
            "refused, yet the body holds the content"
        );
    }
}

fn build(fake: &Fake, dir: &std::path::Path, opts: &Opts) -> Arc<RegistryApi> {
    let store = BlobStore::open(dir).expect("cache opens");
    let metrics = Arc::new(Metrics::default());
    // As the composition root does: offline, registry requests go nowhere.
    let transport: Arc<dyn Transport> = if opts.offline {
        Arc::new(Offline)
    } else {
        Arc::new(fake.clone())
    };
    let upstream = Arc::new(Upstream::with_transport(
        &UpstreamConfig::default(),
        transport,
        Some(metrics.clone()),
    ));
    let cache = Arc::new(Cache::new(
        store.clone(),
        None,
        Limits {
            max_size: 1 << 30,
            min_free: 0,
            max_manifest_size: opts.max_manifest_size,
            max_concurrent_fills: opts.max_concurrent_fills,
        },
    ));
    let access = Arc::new(Access::new(
        store,
        AuthCheck::Upstream,
        opts.offline,
        opts.auth_ttl,
        opts.public_ttl,
    ));
    let mut accounts = Accounts::default();
    for (auth, r) in &opts.auth_hosts {
        accounts
            .auth_hosts
            .entry(reg(auth))
            .or_default()
            .push(reg(r));
    }
    for (r, c) in &opts.accounts {
        accounts
            .credentials
            .insert(reg(r), Account::new(c.clone(), reg(r), Vec::new()));
    }
    let rules = Rules {
        tag_ttl: TagTtl {
            rules: Vec::new(),
            per_registry: HashMap::new(),
            default: opts.tag_ttl,
        },
        negative_ttl: opts.negative_ttl,
        filters: opts
            .filters
            .iter()
            .map(|(r, allow, deny)| {
                let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
                let filter = RepoFilter {
                    allow: strings(allow),
                    deny: strings(deny),
                };
                (reg(r), filter)
            })
            .collect(),
        quota_reserve: opts.quota_reserve,
    };
    Arc::new(RegistryApi::new(
        cache,
        upstream,
        access,
        metrics,
        accounts,
        rules,
        TaskTracker::new(),
    ))
}

impl Harness {
    fn new(fake: &Fake, opts: Opts) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = build(fake, dir.path(), &opts);
        Harness {
            api,
            fake: fake.clone(),
            dir,
        }
    }

    /// A restart: the same cache directory, a new API (grants and probes forgotten).
    async fn reopen(self, opts: Opts) -> Harness {
        self.settle().await;
        let Harness { api, fake, dir } = self;
        // The last reference: the store (and its database lock) goes with it.
        drop(
            Arc::try_unwrap(api)
                .ok()
                .expect("nothing else holds the API"),
        );
        let api = build(&fake, dir.path(), &opts);
        Harness { api, fake, dir }
    }

    /// Waits (boundedly) for the background work requests started: fills and probes.
    async fn settle(&self) {
        for _ in 0..400 {
            if self.api.tasks.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("background tasks still running after 2 s");
    }

    /// One request as a way in hands it over: origin-form path and query, the client's
    /// headers; the body collected (for at most 5 s).
    async fn send(
        &self,
        method: Method,
        registry: &str,
        path: &str,
        headers: &[(&str, &str)],
        answers_challenges: bool,
    ) -> Resp {
        let target = Target {
            registry: reg(registry),
            auth_host: false,
            answers_challenges,
            account: None,
        };
        self.send_to(method, target, path, headers).await
    }

    /// [`Harness::send`] for any target (an auth host's, say).
    async fn send_to(
        &self,
        method: Method,
        target: Target,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Resp {
        let registry = target.registry.clone();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .body(empty())
            .expect("request");
        req.headers_mut().insert(
            HOST,
            HeaderValue::from_str(&registry.authority()).expect("host"),
        );
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        let resp = self.api.serve(Arc::new(target), req).await;
        let (parts, mut body) = resp.into_parts();
        let mut bytes = BytesMut::new();
        let mut error = None;
        let collect = async {
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Ok(d) = f.into_data() {
                            bytes.extend_from_slice(&d);
                        }
                    }
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), collect)
            .await
            .expect("the body ends within 5 s");
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: bytes.freeze(),
            error,
        }
    }

    async fn get(&self, registry: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        let r = self.send(Method::GET, registry, path, headers, false).await;
        self.settle().await;
        r
    }

    async fn head(&self, registry: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        let r = self
            .send(Method::HEAD, registry, path, headers, false)
            .await;
        self.settle().await;
        r
    }

    async fn mirror_get(&self, registry: &str, path: &str) -> Resp {
        let r = self.send(Method::GET, registry, path, &[], true).await;
        self.settle().await;
        r
    }

    fn stored(&self, digest: &Digest) -> bool {
        self.api.cache.store.contains(digest)
    }

    fn public_since(&self, repo: &str) -> Option<u64> {
        self.api
            .cache
            .store
            .public_since(&repo_key(repo))
            .expect("metadata")
    }
}

fn as_alice() -> [(&'static str, &'static str); 1] {
    [("authorization", ALICE)]
}

fn blob_path(repo: &str, d: &Digest) -> String {
    format!("/v2/{repo}/blobs/{d}")
}

fn manifest_path(repo: &str, reference: &str) -> String {
    format!("/v2/{repo}/manifests/{reference}")
}

// ---------------------------------------------------------------------------------------
// Authorization
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_private_blob_goes_only_to_clients_upstream_lets_read_it() {
    let fake = Fake::default();
    fake.repo("quay.io", "team/private", Visibility::Private);
    let img = fake.image("quay.io", "team/private", "1", "private");
    let h = Harness::new(&fake, Opts::default());
    let path = blob_path("team/private", &img.layer_digest);

    let m = fake.mark();
    h.get("quay.io", &path, &as_alice())
        .await
        .assert_ok(&img.layer, "miss");
    assert_eq!(
        fake.since(m),
        [
            "GET blob team/private alice 200",
            "HEAD blob team/private anon 401"
        ],
        "alice's fill, then the anonymous probe"
    );
    assert!(h.stored(&img.layer_digest));
    assert_eq!(h.public_since("quay.io/team/private"), None);

    // Refused clients: upstream is asked with their credentials, and says no.
    for (who, auth, seen) in [
        ("anonymous", None, "HEAD blob team/private anon 401"),
        ("bob", Some(BOB), "HEAD blob team/private bob 401"),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let m = fake.mark();
        let r = h.get("quay.io", &path, &headers).await;
        r.assert_refused(401, &img.layer);
        assert!(
            r.header("www-authenticate")
                .is_some_and(|c| c.starts_with("Basic")),
            "{who}: upstream's challenge is passed on: {r:?}"
        );
        assert_eq!(fake.since(m), [seen], "{who}");
    }

    // Alice: granted by her own fill, served from disk without asking upstream.
    let m = fake.mark();
    h.get("quay.io", &path, &as_alice())
        .await
        .assert_ok(&img.layer, "hit");
    let r = h.head("quay.io", &path, &as_alice()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());
    assert_eq!(
        r.header("content-length"),
        Some(img.layer.len().to_string().as_str())
    );
    assert_eq!(fake.since(m), Vec::<String>::new());
}

#[tokio::test]
async fn the_probe_makes_a_public_repository_readable_by_anyone() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/pub", Visibility::Public);
    let img = fake.image("quay.io", "library/pub", "1", "public");
    let h = Harness::new(&fake, Opts::default());
    let path = blob_path("library/pub", &img.layer_digest);

    let m = fake.mark();
    h.get("quay.io", &path, &as_alice())
        .await
        .assert_ok(&img.layer, "miss");
    assert_eq!(
        fake.since(m),
        [
            "GET blob library/pub alice 200",
            "HEAD blob library/pub anon 200"
        ]
    );
    assert!(h.public_since("quay.io/library/pub").is_some());

    // Public: clients without a grant of their own are served without a question upstream.
    let m = fake.mark();
    h.get("quay.io", &path, &[])
        .await
        .assert_ok(&img.layer, "hit");
    h.get("quay.io", &path, &[("authorization", CAROL)])
        .await
        .assert_ok(&img.layer, "hit");
    assert_eq!(fake.since(m), Vec::<String>::new());

    // The inverse: once the repository is no longer known public, carol is asked about.
    h.api
        .access
        .record_probe(&repo_key("quay.io/library/pub"), StatusCode::UNAUTHORIZED);
    let m = fake.mark();
    h.get("quay.io", &path, &[("authorization", CAROL)])
        .await
        .assert_ok(&img.layer, "hit");
    assert_eq!(fake.since(m), ["HEAD blob library/pub carol 200"]);
}

#[tokio::test]
async fn a_redirect_to_a_login_page_does_not_make_a_repository_public() {
    let fake = Fake::default();
    fake.repo("quay.io", "sso/app", Visibility::Sso);
    let img = fake.image("quay.io", "sso/app", "1", "sso");
    let h = Harness::new(&fake, Opts::default());
    let path = blob_path("sso/app", &img.layer_digest);

    let m = fake.mark();
    h.get("quay.io", &path, &as_alice())
        .await
        .assert_ok(&img.layer, "miss");
    assert_eq!(
        fake.since(m),
        ["GET blob sso/app alice 200", "HEAD blob sso/app anon 302"],
        "the probe got the redirect"
    );
    assert_eq!(h.public_since("quay.io/sso/app"), None);

    // Anonymous: asked upstream, which redirects to a login page; the page is no yes (the
    // login host is not pinned and does not resolve: the redirect itself is refused, 503).
    let m = fake.mark();
    h.get("quay.io", &path, &[])
        .await
        .assert_refused(503, &img.layer);
    assert_eq!(
        fake.since(m),
        ["HEAD blob sso/app anon 302", "GET blob sso/app anon 302",],
        "the login page is never fetched"
    );
    // Alice still is.
    let m = fake.mark();
    h.get("quay.io", &path, &as_alice())
        .await
        .assert_ok(&img.layer, "hit");
    assert_eq!(fake.since(m), Vec::<String>::new());
}

/// quay.io with a public `library/pub` and a private `team/private`, both cached: alice
/// pulled the private image, anyone the public one (and the probe marked it public).
async fn public_and_private(opts: Opts) -> (Harness, Image, Image) {
    let fake = Fake::default();
    fake.repo("quay.io", "library/pub", Visibility::Public);
    fake.repo("quay.io", "team/private", Visibility::Private);
    let public = fake.image("quay.io", "library/pub", "1", "public");
    let private = fake.image("quay.io", "team/private", "1", "private");
    let h = Harness::new(&fake, opts);
    h.get("quay.io", &manifest_path("library/pub", "1"), &[])
        .await
        .assert_ok(&public.manifest, "miss");
    h.get(
        "quay.io",
        &blob_path("library/pub", &public.layer_digest),
        &[],
    )
    .await
    .assert_ok(&public.layer, "miss");
    h.get("quay.io", &manifest_path("team/private", "1"), &as_alice())
        .await
        .assert_ok(&private.manifest, "miss");
    h.get(
        "quay.io",
        &blob_path("team/private", &private.layer_digest),
        &as_alice(),
    )
    .await
    .assert_ok(&private.layer, "miss");
    assert!(h.public_since("quay.io/library/pub").is_some());
    assert_eq!(h.public_since("quay.io/team/private"), None);
    (h, public, private)
}

#[tokio::test]
async fn a_private_digest_under_a_public_repository_is_refused() {
    let (h, public, private) = public_and_private(Opts::default()).await;
    let fake = h.fake.clone();
    let layer_there = blob_path("library/pub", &private.layer_digest);
    let manifest_there = manifest_path("library/pub", &private.digest.to_string());

    // Not known to belong to library/pub: upstream is asked, and answers 404, for anyone.
    for (auth, who) in [(None, "anon"), (Some(ALICE), "alice")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let m = fake.mark();
        h.get("quay.io", &layer_there, &headers)
            .await
            .assert_refused(404, &private.layer);
        h.get("quay.io", &manifest_there, &headers)
            .await
            .assert_refused(404, &private.manifest);
        assert_eq!(
            fake.since(m),
            [
                format!("HEAD blob library/pub {who} 404"),
                format!("HEAD manifest library/pub {who} 404"),
            ]
        );
    }
    // The public repository's own layer is served from disk to anyone.
    let m = fake.mark();
    h.get(
        "quay.io",
        &blob_path("library/pub", &public.layer_digest),
        &[],
    )
    .await
    .assert_ok(&public.layer, "hit");
    assert_eq!(fake.since(m), Vec::<String>::new());
}

#[tokio::test]
async fn a_private_digest_under_a_public_repository_is_refused_while_upstream_fails() {
    let (h, public, private) = public_and_private(Opts::default()).await;
    for failure in [Failure::Unreachable, Failure::Status(503)] {
        h.fake.fail("quay.io", Some(failure));
        h.get(
            "quay.io",
            &blob_path("library/pub", &private.layer_digest),
            &[],
        )
        .await
        .assert_refused(503, &private.layer);
        h.get(
            "quay.io",
            &manifest_path("library/pub", &private.digest.to_string()),
            &[],
        )
        .await
        .assert_refused(503, &private.manifest);
        // What does belong there stays servable.
        h.get(
            "quay.io",
            &blob_path("library/pub", &public.layer_digest),
            &[],
        )
        .await
        .assert_ok(&public.layer, "hit");
    }
}

#[tokio::test]
async fn another_port_is_another_registry() {
    let fake = Fake::default();
    fake.repo("quay.io", "team/app", Visibility::Private);
    fake.repo("quay.io:5000", "team/app", Visibility::Public);
    let a = fake.image("quay.io", "team/app", "1", "registry A");
    let b = fake.image("quay.io:5000", "team/app", "1", "registry B");
    assert_ne!(a.digest, b.digest);
    let h = Harness::new(&fake, Opts::default());
    let tag = manifest_path("team/app", "1");

    h.get("quay.io", &tag, &as_alice())
        .await
        .assert_ok(&a.manifest, "miss");
    h.get(
        "quay.io",
        &blob_path("team/app", &a.layer_digest),
        &as_alice(),
    )
    .await
    .assert_ok(&a.layer, "miss");

    // Same name, same repository, same tag, another port: its own manifest, from upstream.
    let m = fake.mark();
    h.get("quay.io:5000", &tag, &[])
        .await
        .assert_ok(&b.manifest, "miss");
    assert_eq!(
        fake.since_at(m, "quay.io:5000"),
        [
            "GET manifest team/app anon 200",
            "HEAD manifest team/app anon 200"
        ]
    );
    assert_eq!(fake.since_at(m, "quay.io"), Vec::<String>::new());
    // ...and alice gets B there too, and A on 443: each port its own tag row.
    h.get("quay.io:5000", &tag, &as_alice())
        .await
        .assert_ok(&b.manifest, "hit");
    h.get("quay.io", &tag, &as_alice())
        .await
        .assert_ok(&a.manifest, "hit");

    // A's private layer asked for on 5000 (public there): not a member, 5000 says 404.
    let m = fake.mark();
    h.get("quay.io:5000", &blob_path("team/app", &a.layer_digest), &[])
        .await
        .assert_refused(404, &a.layer);
    assert_eq!(
        fake.since_at(m, "quay.io:5000"),
        ["HEAD blob team/app anon 404"]
    );
    // And A's tag is refused to the anonymous client 5000 served.
    h.get("quay.io", &tag, &[])
        .await
        .assert_refused(401, &a.manifest);
}

#[tokio::test]
async fn plain_http_is_another_registry() {
    let fake = Fake::default();
    fake.repo("http://quay.io", "team/app", Visibility::Public);
    fake.repo("quay.io", "team/app", Visibility::Private);
    let plain = fake.image("http://quay.io", "team/app", "1", "plaintext server");
    let tls = fake.image("quay.io", "team/app", "1", "https server");
    let h = Harness::new(&fake, Opts::default());
    let tag = manifest_path("team/app", "1");

    h.get("http://quay.io", &tag, &[])
        .await
        .assert_ok(&plain.manifest, "miss");
    h.get(
        "http://quay.io",
        &blob_path("team/app", &plain.layer_digest),
        &[],
    )
    .await
    .assert_ok(&plain.layer, "miss");

    // The HTTPS client never reads the plaintext server's rows.
    let m = fake.mark();
    h.get("quay.io", &tag, &as_alice())
        .await
        .assert_ok(&tls.manifest, "miss");
    assert_eq!(
        fake.since_at(m, "quay.io"),
        [
            "GET manifest team/app alice 200",
            "HEAD manifest team/app anon 401"
        ]
    );
    // Nor its content as a member of the HTTPS repository.
    let m = fake.mark();
    h.get("quay.io", &blob_path("team/app", &plain.layer_digest), &[])
        .await
        .assert_refused(401, &plain.layer);
    assert_eq!(fake.since_at(m, "quay.io"), ["HEAD blob team/app anon 401"]);
    h.get("quay.io", &tag, &[])
        .await
        .assert_refused(401, &tls.manifest);
}

#[tokio::test]
async fn a_configured_account_opens_only_its_own_registry() {
    let fake = Fake::default();
    fake.repo("quay.io", "team/private", Visibility::Private);
    fake.repo("quay.io:5000", "team/private", Visibility::Private);
    let img = fake.image("quay.io", "team/private", "1", "shared layer");
    // The very same layer on the other port, which Stowage has no account for.
    fake.blob("quay.io:5000", "team/private", &img.layer);
    let h = Harness::new(
        &fake,
        Opts {
            accounts: vec![("quay.io", Credentials::new("alice", "secret"))],
            ..Opts::default()
        },
    );
    let path = blob_path("team/private", &img.layer_digest);

    // Mirror clients send no credentials; Stowage answers the challenge with its account.
    let m = fake.mark();
    h.mirror_get("quay.io", &path)
        .await
        .assert_ok(&img.layer, "miss");
    assert_eq!(
        fake.since(m),
        [
            "GET blob team/private anon 401",
            "GET blob team/private alice 200",
            "HEAD blob team/private anon 401",
        ]
    );
    let m = fake.mark();
    h.mirror_get("quay.io", &path)
        .await
        .assert_ok(&img.layer, "hit");
    assert_eq!(fake.since(m), Vec::<String>::new());

    // The same digest under the same name on :5000: that registry decides, and refuses.
    let m = fake.mark();
    h.mirror_get("quay.io:5000", &path)
        .await
        .assert_refused(401, &img.layer);
    assert_eq!(
        fake.since_at(m, "quay.io:5000"),
        ["HEAD blob team/private anon 401"]
    );
}

#[tokio::test]
async fn a_cached_manifest_is_authorized_like_a_blob() {
    let fake = Fake::default();
    fake.repo("quay.io", "team/private", Visibility::Private);
    let img = fake.image("quay.io", "team/private", "1", "private");
    let h = Harness::new(&fake, Opts::default());
    let by_digest = manifest_path("team/private", &img.digest.to_string());
    let by_tag = manifest_path("team/private", "1");

    h.get("quay.io", &by_tag, &as_alice())
        .await
        .assert_ok(&img.manifest, "miss");

    let m = fake.mark();
    let r = h.get("quay.io", &by_digest, &[]).await;
    r.assert_refused(401, &img.manifest);
    assert!(r.header("www-authenticate").is_some(), "{r:?}");
    // A fresh tag is no way around it.
    h.get("quay.io", &by_tag, &[])
        .await
        .assert_refused(401, &img.manifest);
    assert_eq!(
        fake.since(m),
        [
            "HEAD manifest team/private anon 401",
            "HEAD manifest team/private anon 401"
        ]
    );

    let m = fake.mark();
    let r = h.get("quay.io", &by_digest, &as_alice()).await;
    r.assert_ok(&img.manifest, "hit");
    assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.digest.to_string().as_str())
    );
    assert_eq!(fake.since(m), Vec::<String>::new());
}

#[tokio::test]
async fn an_anonymous_miss_on_a_private_repository_is_relayed_and_not_cached() {
    let fake = Fake::default();
    fake.repo("quay.io", "team/private", Visibility::Private);
    let img = fake.image("quay.io", "team/private", "1", "private");
    let h = Harness::new(&fake, Opts::default());

    let m = fake.mark();
    let r = h
        .get(
            "quay.io",
            &blob_path("team/private", &img.layer_digest),
            &[],
        )
        .await;
    r.assert_refused(401, &img.layer);
    assert_eq!(r.x_cache(), "miss");
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Basic realm="fake registry""#)
    );
    let r = h
        .get("quay.io", &manifest_path("team/private", "1"), &[])
        .await;
    r.assert_refused(401, &img.manifest);
    // No probe: upstream did not serve anything.
    assert_eq!(
        fake.since(m),
        [
            "GET blob team/private anon 401",
            "GET manifest team/private anon 401"
        ]
    );
    assert!(!h.stored(&img.layer_digest) && !h.stored(&img.digest));
    let row = h
        .api
        .cache
        .store
        .tag(&tag_key("quay.io/team/private:1"))
        .unwrap();
    assert!(row.is_none(), "{row:?}");
}

// ---------------------------------------------------------------------------------------
// Tags
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_fresh_tag_is_served_without_asking_upstream() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let img = fake.image("quay.io", "library/app", "1", "v1");
    let h = Harness::new(&fake, Opts::default());
    let tag = manifest_path("library/app", "1");

    let m = fake.mark();
    let r = h.get("quay.io", &tag, &[]).await;
    r.assert_ok(&img.manifest, "miss");
    assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(
        fake.since(m),
        [
            "GET manifest library/app anon 200",
            "HEAD manifest library/app anon 200"
        ]
    );
    // Even when upstream has moved the tag: within the TTL the row answers.
    let v2 = fake.image("quay.io", "library/app", "1", "v2");
    let m = fake.mark();
    for _ in 0..3 {
        h.get("quay.io", &tag, &[])
            .await
            .assert_ok(&img.manifest, "hit");
    }
    let r = h.head("quay.io", &tag, &[]).await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "hit"));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.digest.to_string().as_str())
    );
    assert!(r.body.is_empty());
    assert_eq!(fake.since(m), Vec::<String>::new());
    assert_ne!(v2.digest, img.digest);
}

#[tokio::test]
async fn a_stale_tag_is_revalidated_with_one_head() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let img = fake.image("quay.io", "library/app", "1", "v1");
    let h = Harness::new(&fake, Opts::stale_tags());
    let tag = manifest_path("library/app", "1");

    h.get("quay.io", &tag, &[])
        .await
        .assert_ok(&img.manifest, "miss");
    for _ in 0..2 {
        let m = fake.mark();
        h.get("quay.io", &tag, &[])
            .await
            .assert_ok(&img.manifest, "hit");
        assert_eq!(
            fake.since(m),
            ["HEAD manifest library/app anon 200"],
            "one HEAD, no GET"
        );
    }
}

#[tokio::test]
async fn a_moved_tag_fetches_the_new_manifest() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let v1 = fake.image("quay.io", "library/app", "1", "v1");
    let h = Harness::new(&fake, Opts::stale_tags());
    let tag = manifest_path("library/app", "1");

    h.get("quay.io", &tag, &[])
        .await
        .assert_ok(&v1.manifest, "miss");
    let v2 = fake.image("quay.io", "library/app", "1", "v2");
    let m = fake.mark();
    let r = h.get("quay.io", &tag, &[]).await;
    r.assert_ok(&v2.manifest, "miss");
    assert_eq!(
        r.header("docker-content-digest"),
        Some(v2.digest.to_string().as_str())
    );
    assert_eq!(
        fake.since(m),
        [
            "HEAD manifest library/app anon 200",
            "GET manifest library/app anon 200"
        ]
    );
    // The row now names v2: the next revalidation finds the same digest.
    let m = fake.mark();
    h.get("quay.io", &tag, &[])
        .await
        .assert_ok(&v2.manifest, "hit");
    assert_eq!(fake.since(m), ["HEAD manifest library/app anon 200"]);
}

#[tokio::test]
async fn a_tag_gone_upstream_is_relayed_on_revalidation() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let img = fake.image("quay.io", "library/app", "1", "v1");
    let h = Harness::new(&fake, Opts::stale_tags());
    let tag = manifest_path("library/app", "1");

    h.get("quay.io", &tag, &[])
        .await
        .assert_ok(&img.manifest, "miss");
    fake.untag("quay.io", "library/app", "1");
    let r = h.get("quay.io", &tag, &[]).await;
    r.assert_refused(404, &img.manifest);
    assert_eq!(r.x_cache(), "miss");
    assert!(
        std::str::from_utf8(&r.body)
            .unwrap()
            .contains("MANIFEST_UNKNOWN"),
        "{r:?}"
    );
}

#[tokio::test]
async fn accept_variants_are_cached_separately() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/multi", Visibility::Public);
    let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
    let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","layers":[]}"#;
    fake.manifest("quay.io", "library/multi", Some("1"), OCI_INDEX, index);
    fake.manifest(
        "quay.io",
        "library/multi",
        Some("1"),
        DOCKER_MANIFEST,
        docker,
    );
    let h = Harness::new(&fake, Opts::default());
    let tag = manifest_path("library/multi", "1");

    let cases: [(&str, &[u8], &str, &str); 4] = [
        (OCI_INDEX, index, OCI_INDEX, "miss"),
        (DOCKER_MANIFEST, docker, DOCKER_MANIFEST, "miss"),
        (OCI_INDEX, index, OCI_INDEX, "hit"),
        (DOCKER_MANIFEST, docker, DOCKER_MANIFEST, "hit"),
    ];
    for (accept, body, content_type, x_cache) in cases {
        let r = h.get("quay.io", &tag, &[("accept", accept)]).await;
        r.assert_ok(body, x_cache);
        assert_eq!(r.header("content-type"), Some(content_type), "{accept}");
    }
    // Parameters and case do not make another variant.
    let m = fake.mark();
    h.get(
        "quay.io",
        &tag,
        &[("accept", "Application/VND.oci.image.index.v1+json; q=0.9")],
    )
    .await
    .assert_ok(index, "hit");
    assert_eq!(fake.since(m), Vec::<String>::new());
}

#[tokio::test]
async fn a_tag_resolved_with_head_is_recorded_when_its_manifest_is_fetched() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let img = fake.image("quay.io", "library/app", "1", "v1");
    let h = Harness::new(&fake, Opts::default());
    let accept = [("accept", OCI_MANIFEST)];
    let tag = manifest_path("library/app", "1");

    // containerd: HEAD the tag, then GET the digest it named.
    let r = h.head("quay.io", &tag, &accept).await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "miss"));
    assert!(!h.stored(&img.digest));
    h.get(
        "quay.io",
        &manifest_path("library/app", &img.digest.to_string()),
        &accept,
    )
    .await
    .assert_ok(&img.manifest, "miss");
    let m = fake.mark();
    h.get("quay.io", &tag, &accept)
        .await
        .assert_ok(&img.manifest, "hit");
    assert_eq!(fake.since(m), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// Stale answers while upstream fails
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_stale_tag_is_served_while_upstream_fails_to_a_granted_client_only() {
    // One registry per way of failing: (registry, failure, what the refused client gets,
    // what upstream's log shows). Upstream's own answer is relayed; unreachable, the
    // refusal says why (503, as for a blob).
    let cases = [
        ("quay.io:5001", Failure::Status(503), 503, "503"),
        ("quay.io:5002", Failure::Status(429), 429, "429"),
        ("quay.io:5003", Failure::Unreachable, 503, "err"),
    ];
    let fake = Fake::default();
    let h = Harness::new(&fake, Opts::stale_tags());
    let tag = manifest_path("team/private", "1");
    for (registry, failure, refused, seen) in cases {
        fake.repo(registry, "team/private", Visibility::Private);
        let img = fake.image(registry, "team/private", "1", "private");
        h.get(registry, &tag, &as_alice())
            .await
            .assert_ok(&img.manifest, "miss");
        fake.fail(registry, Some(failure));

        let m = fake.mark();
        let r = h.get(registry, &tag, &as_alice()).await;
        r.assert_ok(&img.manifest, "stale");
        assert_eq!(
            r.header("warning"),
            Some(r#"110 stowage "Response is Stale""#),
            "{failure:?}"
        );
        assert_eq!(
            fake.since(m),
            [format!("HEAD manifest team/private alice {seen}")]
        );

        let r = h.get(registry, &tag, &[]).await;
        r.assert_refused(refused, &img.manifest);
        assert!(r.headers.get(WARNING).is_none());
        assert_ne!(r.x_cache(), "stale", "{failure:?}");
        if refused == 429 {
            assert_eq!(r.header("retry-after"), Some("7"));
        }
    }
}

#[tokio::test]
async fn a_stale_public_tag_is_served_to_anyone_while_upstream_fails() {
    let cases = [
        ("quay.io:5001", Failure::Status(503)),
        ("quay.io:5002", Failure::Status(429)),
        ("quay.io:5003", Failure::Unreachable),
    ];
    let fake = Fake::default();
    let h = Harness::new(&fake, Opts::stale_tags());
    let tag = manifest_path("library/app", "1");
    for (registry, failure) in cases {
        fake.repo(registry, "library/app", Visibility::Public);
        let img = fake.image(registry, "library/app", "1", "public");
        h.get(registry, &tag, &[])
            .await
            .assert_ok(&img.manifest, "miss");
        assert!(h.public_since(&format!("{registry}/library/app")).is_some());
        fake.fail(registry, Some(failure));
        // Carol was never granted anything: the public mark is what lets her in.
        let r = h.get(registry, &tag, &[("authorization", CAROL)]).await;
        r.assert_ok(&img.manifest, "stale");
        assert!(r.headers.contains_key(WARNING), "{failure:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Offline mode
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn offline_after_a_restart_serves_members_of_public_repositories_only() {
    let (h, public, private) = public_and_private(Opts::default()).await;
    let h = h
        .reopen(Opts {
            offline: true,
            ..Opts::stale_tags()
        })
        .await;
    let fake = h.fake.clone();
    fake.fail("quay.io", Some(Failure::Unreachable));
    let m = fake.mark();

    // A public member: served, the tag marked stale (it cannot be revalidated).
    let tag = h
        .get("quay.io", &manifest_path("library/pub", "1"), &[])
        .await;
    tag.assert_ok(&public.manifest, "stale");
    assert!(tag.header("warning").is_some_and(|w| w.starts_with("110 ")));
    h.get(
        "quay.io",
        &blob_path("library/pub", &public.layer_digest),
        &[],
    )
    .await
    .assert_ok(&public.layer, "hit");
    // Not a member of the public repository: refused.
    h.get(
        "quay.io",
        &blob_path("library/pub", &private.layer_digest),
        &[],
    )
    .await
    .assert_refused(503, &private.layer);
    // Private: refused to anyone, alice included (her grant did not survive the restart).
    let private_layer = blob_path("team/private", &private.layer_digest);
    for headers in [&[][..], &as_alice()[..]] {
        h.get("quay.io", &private_layer, headers)
            .await
            .assert_refused(503, &private.layer);
        h.get("quay.io", &manifest_path("team/private", "1"), headers)
            .await
            .assert_refused(503, &private.manifest);
    }
    assert_eq!(fake.since(m), Vec::<String>::new(), "offline asks nobody");
}

#[tokio::test]
async fn offline_asks_nobody_even_for_a_miss() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let img = fake.image("quay.io", "library/app", "1", "public");
    let h = Harness::new(
        &fake,
        Opts {
            offline: true,
            ..Opts::default()
        },
    );
    let m = fake.mark();
    for path in [
        blob_path("library/app", &img.layer_digest),
        manifest_path("library/app", "1"),
        manifest_path("library/app", &img.digest.to_string()),
    ] {
        let r = h.get("quay.io", &path, &as_alice()).await;
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{path}: {text}");
        assert!(text.contains("offline"), "{path}: {text}");
        assert!(!h.stored(&img.layer_digest));
    }
    assert_eq!(fake.since(m), Vec::<String>::new(), "offline asks nobody");
}

#[tokio::test]
async fn a_token_endpoint_that_cannot_answer_gets_a_placeholder_for_public_repositories_only() {
    let opts = Opts {
        auth_hosts: vec![("auth.quay.test", "quay.io")],
        ..Opts::stale_tags()
    };
    let (h, public, private) = public_and_private(opts).await;
    let fake = h.fake.clone();
    let auth = |host: &str| Target {
        registry: reg(host),
        auth_host: true,
        answers_challenges: false,
        account: None,
    };
    let token = |host: &'static str, scopes: &'static str, headers: &'static [(&str, &str)]| {
        let h = &h;
        let target = auth(host);
        async move {
            let path = format!("/token?service=quay.io&{scopes}");
            h.send_to(Method::GET, target, &path, headers).await
        }
    };
    let placeholder = |r: &Resp| {
        r.status == StatusCode::OK
            && serde_json::from_slice::<serde_json::Value>(&r.body).is_ok_and(|v| {
                v["token"] == PLACEHOLDER_TOKEN && v["access_token"] == PLACEHOLDER_TOKEN
            })
    };
    // Online, upstream's own answer is relayed (the fake's registry has no token service:
    // 404), and no placeholder is made.
    let r = h
        .get(
            "quay.io",
            "/v2/auth?scope=repository%3Alibrary%2Fpub%3Apull",
            &[],
        )
        .await;
    assert_eq!((r.status.as_u16(), placeholder(&r)), (404, false), "{r:?}");

    // The registry is down and its auth host (which the fake does not know) too.
    fake.fail("quay.io", Some(Failure::Unreachable));
    const PUBLIC: &str = "scope=repository%3Alibrary%2Fpub%3Apull";
    let r = token("auth.quay.test", PUBLIC, &[]).await;
    assert!(placeholder(&r), "{r:?}");
    assert_eq!(r.x_cache(), "stale");
    // The same from a token endpoint on the registry's own host, with scopes written in
    // every way clients do (repeated, space-separated, `+` for the space).
    for scopes in [
        "scope=repository:library/pub:pull",
        "scope=repository%3Alibrary%2Fpub%3Apull&scope=repository%3Alibrary%2Fpub%3Apull",
        "scope=repository:library/pub:pull+repository:library/pub:pull",
    ] {
        let r = h
            .get(
                "quay.io",
                &format!("/v2/auth?service=quay.io&{scopes}"),
                &[],
            )
            .await;
        assert!(placeholder(&r), "{scopes}: {r:?}");
    }
    // Not for: a private repository, alone or with a public one; anything beyond pull;
    // no scope; a client that brings credentials; an auth host no registry names.
    for (host, scopes, headers) in [
        (
            "auth.quay.test",
            "scope=repository:team/private:pull",
            &[][..],
        ),
        (
            "auth.quay.test",
            "scope=repository:library/pub:pull&scope=repository:team/private:pull",
            &[],
        ),
        (
            "auth.quay.test",
            "scope=repository:library/pub:pull,push",
            &[],
        ),
        ("auth.quay.test", "scope=repository:library/pub:*", &[]),
        ("auth.quay.test", "scope=registry:catalog:*", &[]),
        ("auth.quay.test", "account=alice", &[]),
        ("auth.quay.test", PUBLIC, &[("authorization", ALICE)][..]),
        ("auth.other.test", PUBLIC, &[]),
    ] {
        let r = token(host, scopes, headers).await;
        assert!(!placeholder(&r), "{host} {scopes} {headers:?}: {r:?}");
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{host} {scopes}: {r:?}");
    }

    // The placeholder opens what anonymous clients may read, and never leaves Stowage.
    let bearer = format!("Bearer {PLACEHOLDER_TOKEN}");
    let with_it = [("authorization", bearer.as_str())];
    let m = fake.mark();
    let tag = h
        .get("quay.io", &manifest_path("library/pub", "1"), &with_it)
        .await;
    tag.assert_ok(&public.manifest, "stale");
    h.get(
        "quay.io",
        &blob_path("library/pub", &public.layer_digest),
        &with_it,
    )
    .await
    .assert_ok(&public.layer, "hit");
    h.get(
        "quay.io",
        &blob_path("team/private", &private.layer_digest),
        &with_it,
    )
    .await
    .assert_refused(503, &private.layer);
    h.get("quay.io", &manifest_path("team/private", "1"), &with_it)
        .await
        .assert_refused(503, &private.manifest);
    // Online again: the placeholder client is anonymous upstream too.
    fake.fail("quay.io", None);
    h.get("quay.io", &manifest_path("team/private", "1"), &with_it)
        .await
        .assert_refused(401, &private.manifest);
    h.get("quay.io", &manifest_path("library/pub", "1"), &with_it)
        .await
        .assert_ok(&public.manifest, "hit");
    let sent = fake.state().seen[m..]
        .iter()
        .filter_map(|s| s.authorization.clone())
        .collect::<Vec<_>>();
    assert!(
        sent.iter().all(|a| !a.contains(PLACEHOLDER_TOKEN)),
        "the placeholder went upstream: {sent:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Repository filters
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn repository_filters_deny_before_anything_is_asked() {
    let fake = Fake::default();
    for repo in ["library/alpine", "myorg/app", "myorg/secret/x", "other/app"] {
        fake.repo("quay.io", repo, Visibility::Public);
        fake.repo("quay.io:5000", repo, Visibility::Public);
    }
    let images: HashMap<&str, Image> =
        ["library/alpine", "myorg/app", "myorg/secret/x", "other/app"]
            .into_iter()
            .map(|r| (r, fake.image("quay.io", r, "1", r)))
            .collect();
    for r in ["myorg/secret/x", "other/app"] {
        fake.image("quay.io:5000", r, "1", r);
    }
    let h = Harness::new(
        &fake,
        Opts {
            filters: vec![("quay.io", &["library/*", "myorg/**"], &["myorg/secret/**"])],
            ..Opts::default()
        },
    );
    // Allowed: served as ever.
    for repo in ["library/alpine", "myorg/app"] {
        let img = &images[repo];
        h.get("quay.io", &manifest_path(repo, "1"), &[])
            .await
            .assert_ok(&img.manifest, "miss");
        h.get("quay.io", &blob_path(repo, &img.layer_digest), &[])
            .await
            .assert_ok(&img.layer, "miss");
    }
    // Denied, whatever the request: 403 DENIED naming the rule, and upstream never asked.
    let m = fake.mark();
    for (repo, rule) in [
        ("myorg/secret/x", r#"deny = \"myorg/secret/**\""#),
        ("other/app", "not in allow"),
    ] {
        let img = &images[repo];
        let paths = [
            manifest_path(repo, "1"),
            manifest_path(repo, &img.digest.to_string()),
            blob_path(repo, &img.layer_digest),
            format!("/v2/{repo}/tags/list"),
            format!("/v2/{repo}/blobs/uploads/"),
        ];
        for path in &paths {
            for method in [Method::GET, Method::HEAD] {
                let r = h
                    .send(method.clone(), "quay.io", path, &as_alice(), false)
                    .await;
                assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {path}: {r:?}");
                assert_eq!(r.x_cache(), "denied", "{method} {path}");
                if method == Method::GET {
                    let text = String::from_utf8_lossy(&r.body);
                    assert!(
                        text.contains("DENIED") && text.contains(rule),
                        "{path}: {text}"
                    );
                }
            }
        }
        let r = h.send(Method::POST, "quay.io", &paths[4], &[], false).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "a push to {repo}: {r:?}");
        // Through the mirror too.
        let r = h.mirror_get("quay.io", &manifest_path(repo, "1")).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "mirror: {r:?}");
    }
    // A path whose repository cannot be read is denied where a filter applies: upstream
    // could decode it into a denied repository.
    for path in [
        "/v2/myorg/secret%2Fx/manifests/1",
        "/v2/myorg%2Fsecret%2Fx/tags/list",
    ] {
        let r = h.get("quay.io", path, &[]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {r:?}");
    }
    assert_eq!(
        fake.since(m),
        Vec::<String>::new(),
        "a denied request went upstream"
    );
    assert!(!h.stored(&images["myorg/secret/x"].layer_digest));
    // The version check and another registry (another port) are not filtered.
    let r = h.get("quay.io", "/v2/", &[]).await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "pass"), "{r:?}");
    let r = h
        .get("quay.io:5000", &manifest_path("other/app", "1"), &[])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
}

#[tokio::test]
async fn concurrent_revalidations_of_one_tag_are_one_upstream_head() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    fake.repo("quay.io", "team/private", Visibility::Private);
    let public = fake.image("quay.io", "library/app", "1", "public");
    let private = fake.image("quay.io", "team/private", "1", "private");
    let h = Harness::new(&fake, Opts::stale_tags());
    let tag = manifest_path("library/app", "1");
    let private_tag = manifest_path("team/private", "1");
    h.get("quay.io", &tag, &[])
        .await
        .assert_ok(&public.manifest, "miss");
    h.get("quay.io", &private_tag, &as_alice())
        .await
        .assert_ok(&private.manifest, "miss");
    fake.state().head_delay = Duration::from_millis(200);

    let m = fake.mark();
    let crowd = (0..100).map(|_| h.send(Method::GET, "quay.io", &tag, &[], false));
    for r in futures_util::future::join_all(crowd).await {
        r.assert_ok(&public.manifest, "hit");
    }
    assert_eq!(fake.since(m), ["HEAD manifest library/app anon 200"]);
    // One per credential: alice's revalidation is hers, and bob's answer is not alice's.
    let m = fake.mark();
    let as_alice = as_alice();
    let alice = (0..20).map(|_| h.send(Method::GET, "quay.io", &private_tag, &as_alice, false));
    let bob = (0..20).map(|_| {
        h.send(
            Method::GET,
            "quay.io",
            &private_tag,
            &[("authorization", BOB)],
            false,
        )
    });
    let (alice, bob) = tokio::join!(
        futures_util::future::join_all(alice),
        futures_util::future::join_all(bob)
    );
    for r in alice {
        r.assert_ok(&private.manifest, "hit");
    }
    for r in bob {
        r.assert_refused(401, &private.manifest);
    }
    let mut seen = fake.since(m);
    seen.sort();
    assert_eq!(
        seen,
        [
            "HEAD manifest team/private alice 200",
            "HEAD manifest team/private bob 401"
        ]
    );
    // Shared only while in flight: the next revalidation asks again.
    let m = fake.mark();
    h.get("quay.io", &tag, &[])
        .await
        .assert_ok(&public.manifest, "hit");
    assert_eq!(fake.since(m), ["HEAD manifest library/app anon 200"]);
}

#[tokio::test]
async fn the_quota_guard_stops_revalidations_below_the_reserve_until_the_window_passes() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let img = fake.image("quay.io", "library/app", "1", "public");
    let h = Harness::new(&fake, Opts::stale_tags());
    let tag = manifest_path("library/app", "1");
    let gauge = || {
        h.api
            .metrics
            .render()
            .lines()
            .find(|l| l.starts_with("stowage_quota_guard_engaged{"))
            .map(str::to_owned)
    };
    // Plenty left: every stale tag is revalidated.
    fake.state().ratelimit = Some((100, 50, 2));
    h.get("quay.io", &tag, &[])
        .await
        .assert_ok(&img.manifest, "miss");
    let m = fake.mark();
    h.get("quay.io", &tag, &[])
        .await
        .assert_ok(&img.manifest, "hit");
    assert_eq!(fake.since(m), ["HEAD manifest library/app anon 200"]);
    // The revalidation that learns 5 of 100 are left (below 10%) engages the guard ...
    fake.state().ratelimit = Some((100, 5, 2));
    h.get("quay.io", &tag, &[])
        .await
        .assert_ok(&img.manifest, "hit");
    assert!(gauge().is_some_and(|l| l.ends_with(" 1")), "{:?}", gauge());
    // ... and for the rest of the window nothing is asked: served stale.
    let m = fake.mark();
    for _ in 0..5 {
        let r = h.get("quay.io", &tag, &[]).await;
        r.assert_ok(&img.manifest, "stale");
        assert!(r.header("warning").is_some_and(|w| w.starts_with("110 ")));
    }
    assert_eq!(fake.since(m), Vec::<String>::new());
    // Another account is not this one.
    let m = fake.mark();
    h.get("quay.io", &tag, &as_alice())
        .await
        .assert_ok(&img.manifest, "hit");
    assert_eq!(fake.since(m), ["HEAD manifest library/app alice 200"]);
    // After the window: revalidated again, and released once upstream has pulls left.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    fake.state().ratelimit = Some((100, 100, 2));
    let m = fake.mark();
    h.get("quay.io", &tag, &[])
        .await
        .assert_ok(&img.manifest, "hit");
    h.get("quay.io", &tag, &[])
        .await
        .assert_ok(&img.manifest, "hit");
    assert_eq!(fake.since(m).len(), 2, "{:?}", fake.since(m));
    assert!(gauge().is_some_and(|l| l.ends_with(" 0")), "{:?}", gauge());
}

// ---------------------------------------------------------------------------------------
// Negative answers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_404_storm_makes_one_upstream_request_within_negative_ttl() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    fake.repo("quay.io", "team/private", Visibility::Private);
    let h = Harness::new(
        &fake,
        Opts {
            negative_ttl: Duration::from_millis(400),
            ..Opts::default()
        },
    );
    let missing = manifest_path("library/app", "misspelled");
    let m = fake.mark();
    let storm: Vec<_> = (0..100)
        .map(|_| h.send(Method::GET, "quay.io", &missing, &[], false))
        .collect();
    // Sequentially first (a storm arrives over time), then 100 at once.
    let first = h.get("quay.io", &missing, &[]).await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (404, "miss"));
    for r in futures_util::future::join_all(storm).await {
        assert_eq!((r.status.as_u16(), r.x_cache()), (404, "hit"), "{r:?}");
    }
    for _ in 0..3 {
        let r = h.head("quay.io", &missing, &[]).await;
        assert_eq!(r.status.as_u16(), 404);
    }
    assert_eq!(fake.since(m), ["GET manifest library/app anon 404"]);
    // Per credential: alice asks upstream once for herself.
    let r = h.get("quay.io", &missing, &as_alice()).await;
    assert_eq!(r.x_cache(), "miss");
    // Never for other statuses: a 401 is asked every time.
    let m = fake.mark();
    for _ in 0..3 {
        let r = h
            .get("quay.io", &manifest_path("team/private", "1"), &[])
            .await;
        assert_eq!(r.status.as_u16(), 401);
    }
    assert_eq!(fake.since(m).len(), 3, "{:?}", fake.since(m));
    // After the TTL, upstream is asked again, and a tag pushed meanwhile is found.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let img = fake.image("quay.io", "library/app", "misspelled", "now it exists");
    h.get("quay.io", &missing, &[])
        .await
        .assert_ok(&img.manifest, "miss");
}

// ---------------------------------------------------------------------------------------
// Upstream errors
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_404_is_relayed_and_nothing_is_cached() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let h = Harness::new(&fake, Opts::default());
    let missing = sha256(b"never pushed");
    let paths = [
        blob_path("library/app", &missing),
        manifest_path("library/app", &missing.to_string()),
        manifest_path("library/app", "nope"),
    ];
    for round in 0..2 {
        let m = fake.mark();
        for p in &paths {
            let r = h.get("quay.io", p, &[]).await;
            assert_eq!(
                (r.status, r.x_cache()),
                (StatusCode::NOT_FOUND, "miss"),
                "{p}"
            );
        }
        // Asked again every time: a 404 is not remembered.
        assert_eq!(
            fake.since(m),
            [
                "GET blob library/app anon 404",
                "GET manifest library/app anon 404",
                "GET manifest library/app anon 404"
            ],
            "round {round}"
        );
    }
    assert!(!h.stored(&missing));
    let row = h.api.cache.store.tag(&tag_key("quay.io/library/app:nope"));
    assert!(row.unwrap().is_none());
    assert_eq!(
        h.public_since("quay.io/library/app"),
        None,
        "no probe either"
    );
}

#[tokio::test]
async fn a_manifest_that_does_not_match_its_digest_is_refused_and_not_stored() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let claimed = sha256(b"the manifest upstream claims to serve");
    let served = br#"{"schemaVersion":2,"evil":true}"#;
    fake.manifest_as(
        "quay.io",
        "library/app",
        Some("bad"),
        &claimed,
        OCI_MANIFEST,
        served,
    );
    let h = Harness::new(&fake, Opts::default());

    for path in [
        manifest_path("library/app", &claimed.to_string()),
        manifest_path("library/app", "bad"),
    ] {
        let r = h.get("quay.io", &path, &[]).await;
        r.assert_refused(502, served);
        assert!(
            std::str::from_utf8(&r.body)
                .unwrap()
                .contains("DIGEST_INVALID"),
            "{r:?}"
        );
    }
    assert!(!h.stored(&claimed) && !h.stored(&sha256(served)));
    let row = h.api.cache.store.tag(&tag_key("quay.io/library/app:bad"));
    assert!(row.unwrap().is_none());
}

/// Whether a blob response that must not deliver `bytes` complete did not.
fn assert_never_complete(r: &Resp, bytes: &[u8]) {
    if r.status == StatusCode::OK {
        assert!(r.error.is_some(), "the body ended cleanly: {r:?}");
        assert!(
            r.body.len() < bytes.len(),
            "all {} bytes delivered",
            bytes.len()
        );
    }
}

#[tokio::test]
async fn a_blob_with_wrong_bytes_is_never_delivered_complete() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let claimed = sha256(b"the real layer");
    let served = b"not the real layer, but just as long as one".repeat(20);
    fake.blob_as("quay.io", "library/app", &claimed, &served);
    let h = Harness::new(&fake, Opts::default());
    let path = blob_path("library/app", &claimed);

    for _ in 0..2 {
        let m = fake.mark();
        let r = h.get("quay.io", &path, &[]).await;
        assert_never_complete(&r, &served);
        assert!(!h.stored(&claimed));
        assert_eq!(
            fake.since(m).first().map(String::as_str),
            Some("GET blob library/app anon 200"),
            "nothing cached: asked again"
        );
    }
    // The same for a blob passed through without a fill (the fill limit reached).
    let h = Harness::new(
        &fake,
        Opts {
            max_concurrent_fills: 0,
            ..Opts::default()
        },
    );
    let r = h.get("quay.io", &path, &[]).await;
    assert_never_complete(&r, &served);
    assert!(!h.stored(&claimed));
}

#[tokio::test]
async fn a_blob_passed_through_without_a_fill_is_complete_and_not_stored() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let img = fake.image("quay.io", "library/app", "1", "v1");
    let h = Harness::new(
        &fake,
        Opts {
            max_concurrent_fills: 0,
            ..Opts::default()
        },
    );
    let path = blob_path("library/app", &img.layer_digest);
    for _ in 0..2 {
        h.get("quay.io", &path, &[])
            .await
            .assert_ok(&img.layer, "miss");
    }
    assert!(!h.stored(&img.layer_digest));
}

#[tokio::test]
async fn upstream_failures_on_a_miss_are_relayed_and_nothing_is_cached() {
    let cases = [
        ("quay.io:5001", Failure::Status(503), 503),
        ("quay.io:5002", Failure::Status(429), 429),
        ("quay.io:5003", Failure::Unreachable, 502),
    ];
    let fake = Fake::default();
    let h = Harness::new(&fake, Opts::default());
    for (registry, failure, status) in cases {
        fake.repo(registry, "library/app", Visibility::Public);
        let img = fake.image(registry, "library/app", "1", "v1");
        fake.fail(registry, Some(failure));
        for path in [
            blob_path("library/app", &img.layer_digest),
            manifest_path("library/app", "1"),
        ] {
            let r = h.get(registry, &path, &[]).await;
            assert_eq!(
                (r.status.as_u16(), r.x_cache()),
                (status, "miss"),
                "{failure:?} {path}: {r:?}"
            );
        }
        assert!(!h.stored(&img.layer_digest) && !h.stored(&img.digest));
    }
}

#[tokio::test]
async fn ranges_on_a_cached_blob() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let img = fake.image("quay.io", "library/app", "1", "v1");
    let h = Harness::new(&fake, Opts::default());
    let path = blob_path("library/app", &img.layer_digest);
    let len = img.layer.len();
    h.get("quay.io", &path, &[])
        .await
        .assert_ok(&img.layer, "miss");

    let m = fake.mark();
    for (range, start, end) in [
        ("bytes=100-199".to_string(), 100, 200),
        ("bytes=-10".to_string(), len - 10, len),
        (format!("bytes={}-", len - 1), len - 1, len),
    ] {
        let r = h.get("quay.io", &path, &[("range", &range)]).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{range}: {r:?}");
        assert_eq!(
            r.headers.get(CONTENT_RANGE).unwrap(),
            &format!("bytes {start}-{}/{len}", end - 1),
            "{range}"
        );
        assert_eq!(r.body, img.layer[start..end], "{range}");
        assert_eq!(r.x_cache(), "hit");
    }
    let r = h
        .get("quay.io", &path, &[("range", &format!("bytes={len}-"))])
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{len}").as_str())
    );
    assert_eq!(fake.since(m), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// X-Cache and coalescing
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn x_cache_says_where_each_answer_came_from() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let img = fake.image("quay.io", "library/app", "1", "v1");
    let h = Harness::new(&fake, Opts::default());
    let blob = blob_path("library/app", &img.layer_digest);

    let m = fake.mark();
    let r = h.get("quay.io", "/v2/", &[]).await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "pass"));
    let r = h
        .get("quay.io", "/v2/library/app/tags/list?n=10", &[])
        .await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::NOT_FOUND, "pass"));
    assert_eq!(
        fake.since(m),
        ["GET base - anon 200", "GET other - anon 404"]
    );

    h.get("quay.io", &blob, &[])
        .await
        .assert_ok(&img.layer, "miss");
    h.get("quay.io", &blob, &[])
        .await
        .assert_ok(&img.layer, "hit");
    let r = h.head("quay.io", &blob, &[]).await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "hit"));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.layer_digest.to_string().as_str())
    );
    assert_eq!(
        r.header("content-length"),
        Some(img.layer.len().to_string().as_str())
    );
    assert!(r.body.is_empty());
    // A HEAD on a miss is answered upstream and fills nothing.
    let other = fake.blob("quay.io", "library/app", b"another layer");
    let r = h
        .head("quay.io", &blob_path("library/app", &other), &[])
        .await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "miss"));
    assert!(!h.stored(&other));
}

#[tokio::test]
async fn concurrent_misses_share_one_download() {
    let fake = Fake::default();
    fake.repo("quay.io", "team/private", Visibility::Private);
    let img = fake.image("quay.io", "team/private", "1", "private");
    let gate = fake.hold_blobs();
    let h = Harness::new(&fake, Opts::default());
    let path = blob_path("team/private", &img.layer_digest);

    let alice = as_alice();
    let m = fake.mark();
    let (first, second, ()) = tokio::join!(
        h.send(Method::GET, "quay.io", &path, &alice, false),
        h.send(Method::GET, "quay.io", &path, &alice, false),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            gate.send_replace(true);
        }
    );
    h.settle().await;
    first.assert_ok(&img.layer, "miss");
    second.assert_ok(&img.layer, "coalesced");
    // The follower joins before the leader's bytes have verified, so no grant exists yet
    // (a miss grants only once its content verifies): it is asked about with one HEAD.
    assert_eq!(
        fake.since(m),
        [
            "GET blob team/private alice 200",
            "HEAD blob team/private alice 200",
            "HEAD blob team/private anon 401"
        ]
    );
    assert!(h.stored(&img.layer_digest));
}

/// A connection thread (`ingress::workers`: a current-thread runtime of its own) that asks
/// for a miss hands the fill to the runtime the API was built on
/// (`RegistryApi::spawn_background`): the fill finishes and stores the blob after that
/// thread and its runtime are gone, and the next client gets a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_started_on_a_connection_thread_outlives_the_thread() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let img = fake.image("quay.io", "library/app", "1", "app");
    let gate = fake.hold_blobs();
    let h = Arc::new(Harness::new(&fake, Opts::default()));
    let path = blob_path("library/app", &img.layer_digest);

    let (on_thread, thread_path) = (h.clone(), path.clone());
    let timed_out = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a connection thread's runtime");
        // The body waits on the gate: the client gives up while the fill is under way,
        // and the thread's runtime is dropped with whatever it still runs.
        let r = rt.block_on(async {
            let req = on_thread.send(Method::GET, "quay.io", &thread_path, &[], false);
            tokio::time::timeout(Duration::from_millis(300), req).await
        });
        drop(rt);
        r.is_err()
    })
    .await
    .expect("the connection thread");
    assert!(timed_out, "the body waited on the gate");
    assert!(
        !h.stored(&img.layer_digest),
        "held upstream: not filled yet"
    );

    let m = fake.mark();
    gate.send_replace(true);
    h.settle().await;
    assert!(h.stored(&img.layer_digest), "the fill outlived its thread");
    h.get("quay.io", &path, &[])
        .await
        .assert_ok(&img.layer, "hit");
    let downloads: Vec<_> = fake
        .since(m)
        .into_iter()
        .filter(|s| s.starts_with("GET blob"))
        .collect();
    assert_eq!(downloads, Vec::<String>::new(), "no second download");
}

// ---------------------------------------------------------------------------------------
// Found here: redirects that end at a login page, on a miss
// ---------------------------------------------------------------------------------------

/// The probe does not count a redirect as public, but a miss follows redirects (blob
/// storage) and counts the login page's `200` at the end as upstream's yes: the anonymous
/// client is granted the repository for `auth_ttl` (and the digest recorded as a member),
/// before the fill fails its digest check. Once alice fills the blob, the anonymous client
/// gets her private layer from disk without a question upstream.
#[tokio::test]
async fn an_anonymous_miss_redirected_to_a_login_page_grants_nothing() {
    let fake = Fake::default();
    fake.repo("quay.io", "sso/app", Visibility::Sso);
    let img = fake.image("quay.io", "sso/app", "1", "sso");
    let h = Harness::new(&fake, Opts::default());
    let path = blob_path("sso/app", &img.layer_digest);

    let r = h.get("quay.io", &path, &[]).await;
    assert_never_complete(&r, LOGIN_PAGE.as_bytes());
    assert!(!h.stored(&img.layer_digest));
    h.get("quay.io", &path, &as_alice())
        .await
        .assert_ok(&img.layer, "miss");
    let r = h.get("quay.io", &path, &[]).await;
    // Refused: the login host's redirect is not followed (unresolvable, unpinned), 503.
    r.assert_refused(503, &img.layer);
}

/// The same on a tag: the login page's `200` (no `Docker-Content-Digest`, hashed as it
/// came) is stored as the tag's manifest with media type `text/html`, and the tag row then
/// answers everyone with the same `Accept` until the TTL ends: alice, who may read the
/// repository, gets `404 NAME_UNKNOWN` (`X-Cache: hit`: upstream has no manifest with the
/// page's digest) instead of her image. The anonymous client, answered `200` with the page,
/// is also granted the repository, as in the blob case above.
#[tokio::test]
async fn an_anonymous_tag_miss_redirected_to_a_login_page_caches_nothing() {
    let fake = Fake::default();
    fake.repo("quay.io", "sso/app", Visibility::Sso);
    let img = fake.image("quay.io", "sso/app", "1", "sso");
    let h = Harness::new(&fake, Opts::default());
    let tag = manifest_path("sso/app", "1");
    let accept = [("accept", OCI_MANIFEST)];

    // An anonymous client first: whatever it gets, nothing of it may stay.
    h.get("quay.io", &tag, &accept).await;
    let row = h
        .api
        .cache
        .store
        .tag(&tag_key("quay.io/sso/app:1"))
        .unwrap();
    assert!(row.is_none(), "a tag row from a login page: {row:?}");
    assert!(!h.stored(&sha256(LOGIN_PAGE.as_bytes())));
    // Alice, who may read the repository, gets her image.
    let r = h
        .get(
            "quay.io",
            &tag,
            &[("accept", OCI_MANIFEST), ("authorization", ALICE)],
        )
        .await;
    r.assert_ok(&img.manifest, "miss");
}

// ---------------------------------------------------------------------------------------
// Issue 14, item 5: manifest fills buffer within a bounded total
// ---------------------------------------------------------------------------------------

/// Manifests are verified in memory before they are stored, so many slow fills at once held
/// a whole manifest each (300 slow 4 MiB fills: 1.26 GB). In total they may now hold 16 x
/// `max_manifest_size`; a manifest beyond that is relayed uncached (and, by digest, still
/// verified on the way), and the budget is whole again once the fills end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_fills_beyond_the_memory_budget_are_relayed_uncached() {
    let fake = Fake::default();
    fake.repo("quay.io", "big/app", Visibility::Public);
    // 3,500 bytes each: 4 KiB of budget each, 16 of them fill the 64 KiB of 16 x 4 KiB.
    let manifests: Vec<(Digest, Vec<u8>)> = (0..18)
        .map(|i| {
            let pad = "x".repeat(3400);
            let bytes = format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","annotations":{{"n":"{i}","pad":"{pad}"}}}}"#
            )
            .into_bytes();
            let d = fake.manifest("quay.io", "big/app", None, OCI_MANIFEST, &bytes);
            (d, bytes)
        })
        .collect();
    let gate = fake.hold_manifests();
    let h = Arc::new(Harness::new(
        &fake,
        Opts {
            max_manifest_size: 4096,
            ..Opts::default()
        },
    ));
    let path = |d: &Digest| manifest_path("big/app", &d.to_string());
    let held: Vec<_> = manifests[..16]
        .iter()
        .map(|(d, _)| {
            let (h, p) = (h.clone(), path(d));
            tokio::spawn(async move { h.send(Method::GET, "quay.io", &p, &[], false).await })
        })
        .collect();
    // All sixteen are buffering (upstream sent their first chunk and holds the rest).
    for _ in 0..400 {
        if fake
            .since(0)
            .iter()
            .filter(|s| s.starts_with("GET manifest"))
            .count()
            == 16
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (over_d, over) = &manifests[16];
    let over_path = path(over_d);
    let (beyond, ()) = tokio::join!(
        h.send(Method::GET, "quay.io", &over_path, &[], false),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            gate.send_replace(true);
        }
    );
    beyond.assert_ok(over, "miss");
    for (task, (d, bytes)) in held.into_iter().zip(&manifests) {
        task.await.unwrap().assert_ok(bytes, "miss");
        assert!(h.stored(d), "a fill within the budget was stored");
    }
    h.settle().await;
    assert!(
        !h.stored(over_d),
        "the manifest beyond the budget was buffered and stored"
    );
    // The budget is back: the next fill is stored again.
    let (last_d, last) = &manifests[17];
    h.get("quay.io", &path(last_d), &[])
        .await
        .assert_ok(last, "miss");
    assert!(h.stored(last_d));
}

// ---------------------------------------------------------------------------------------
// Issue 15: tags are content-negotiated
// ---------------------------------------------------------------------------------------

/// The lists real clients send.
const DOCKER_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";
const CONTAINERD_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A manifest stored for one client's `Accept` answers clients with other lists (`*/*`, none,
/// containerd's) from the cache with its own `Content-Type`, online and with upstream down.
#[tokio::test]
async fn a_tag_stored_for_one_accept_list_answers_every_list_that_admits_it() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let img = fake.image("quay.io", "library/app", "1", "negotiated");
    let h = Harness::new(&fake, Opts::default());
    let tag = manifest_path("library/app", "1");
    h.get("quay.io", &tag, &[("accept", DOCKER_ACCEPT)])
        .await
        .assert_ok(&img.manifest, "miss");
    let m = fake.mark();
    let others: [&[(&str, &str)]; 4] = [
        &[("accept", "*/*")],
        &[],
        &[("accept", CONTAINERD_ACCEPT)],
        &[("accept", OCI_MANIFEST)],
    ];
    for headers in others {
        let r = h.get("quay.io", &tag, headers).await;
        r.assert_ok(&img.manifest, "hit");
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST), "{headers:?}");
    }
    assert_eq!(fake.since(m), Vec::<String>::new(), "asked upstream");
    // Upstream down, the tag stale: still answered, marked stale, for any admitting list.
    let h = h.reopen(Opts::stale_tags()).await;
    fake.fail("quay.io", Some(Failure::Unreachable));
    for headers in others {
        let r = h.get("quay.io", &tag, headers).await;
        r.assert_ok(&img.manifest, "stale");
    }
    // A client that does not take its type is not given it.
    let r = h.get("quay.io", &tag, &[("accept", DOCKER_MANIFEST)]).await;
    assert_ne!(
        r.status,
        StatusCode::OK,
        "served a type the client refused: {r:?}"
    );
}

/// An index is never served to a client that does not take indexes, and a single-platform
/// manifest that upstream chose for such a client is not served to one that takes indexes
/// (the tag is an index: that would be one platform's image for everyone).
#[tokio::test]
async fn an_index_goes_only_to_clients_that_take_indexes() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/multi", Visibility::Public);
    let platform = fake.image("quay.io", "library/multi", "unused", "amd64");
    let index = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        platform.digest,
        platform.manifest.len()
    ));
    // The tag: the index for clients that take it, else the platform manifest (as
    // registries resolve an index for old clients).
    fake.manifest("quay.io", "library/multi", Some("1"), OCI_INDEX, &index);
    fake.manifest(
        "quay.io",
        "library/multi",
        Some("1"),
        OCI_MANIFEST,
        &platform.manifest,
    );
    let h = Harness::new(&fake, Opts::default());
    let tag = manifest_path("library/multi", "1");
    // An old client first: it gets (and Stowage stores) the platform manifest.
    h.get("quay.io", &tag, &[("accept", OCI_MANIFEST)])
        .await
        .assert_ok(&platform.manifest, "miss");
    // A client that takes indexes must not be given that manifest from the cache.
    let r = h.get("quay.io", &tag, &[("accept", "*/*")]).await;
    r.assert_ok(&index, "miss");
    assert_eq!(r.header("content-type"), Some(OCI_INDEX));
    // Now both are known: each client gets its own from the cache.
    let m = fake.mark();
    let r = h
        .get("quay.io", &tag, &[("accept", CONTAINERD_ACCEPT)])
        .await;
    r.assert_ok(&index, "hit");
    let r = h
        .get(
            "quay.io",
            &tag,
            &[("accept", &format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}"))],
        )
        .await;
    r.assert_ok(&platform.manifest, "hit");
    assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
    let r = h.get("quay.io", &tag, &[("accept", DOCKER_LIST)]).await;
    assert_ne!(
        r.header("content-type"),
        Some(OCI_MANIFEST),
        "a platform manifest to a client that asked for a list only"
    );
    assert_eq!(fake.since(m).len(), 1, "{:?}", fake.since(m));
}

/// Issue 15: the version check is answered (200, stale) when upstream cannot answer it, so
/// Go clients go on to ask for what is cached; online it is upstream's answer.
#[tokio::test]
async fn the_version_check_is_answered_when_upstream_cannot() {
    let fake = Fake::default();
    fake.repo("quay.io", "library/app", Visibility::Public);
    let h = Harness::new(&fake, Opts::default());
    let online = h.get("quay.io", "/v2/", &[]).await;
    assert_eq!(online.x_cache(), "pass", "{online:?}");
    for failure in [
        Failure::Unreachable,
        Failure::Status(503),
        Failure::Status(429),
    ] {
        fake.fail("quay.io", Some(failure));
        let r = h.get("quay.io", "/v2/", &[]).await;
        assert_eq!(
            (r.status, r.x_cache()),
            (StatusCode::OK, "stale"),
            "{failure:?}: {r:?}"
        );
        assert_eq!(
            r.header("docker-distribution-api-version"),
            Some("registry/2.0")
        );
    }
    // Not every failure is upstream's: a 401 or 404 is its answer, passed on.
    fake.fail("quay.io", Some(Failure::Status(401)));
    let r = h.get("quay.io", "/v2/", &[]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (401, "pass"));
    // Offline answers as an unreachable upstream does, even while upstream is up: the
    // check never goes there.
    fake.fail("quay.io", None);
    let h = h
        .reopen(Opts {
            offline: true,
            ..Opts::default()
        })
        .await;
    let m = fake.mark();
    let r = h.get("quay.io", "/v2/", &[]).await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "stale"));
    assert_eq!(fake.since(m), Vec::<String>::new(), "offline asks nobody");
}
