//! The request-path harness shared by `request_proxy` and `request_mirror`: one in-process
//! Stowage (`Server::bind_with_transport`) in front of an in-process fake upstream, built
//! once per fuzzing process; each input is the raw bytes a client sends on one connection
//! (HTTP/1.1 or h2 prior knowledge) to the proxy or the mirror listener
//! (`Server::serve_connection` over a `tokio::io::duplex`).
//!
//! The runtime is current-thread on paused time: when every task waits, the clock jumps to
//! the next timer, so a connection that sends nothing more is ended by Stowage's own
//! header and idle timeouts at once, without wall-clock sleeps (tokio stops the clock
//! while `spawn_blocking` work runs, so file work is never timed out by the jump).
//!
//! After each input, once Stowage's background work has settled, it asserts:
//! 1. no panic (libFuzzer aborts on one, in any task);
//! 2. every object in `<cache>/blobs/` hashes to its file name;
//! 3. no byte run of the private repository's content (a marker repeated through its
//!    blob and inside its manifest) appears in anything sent back to the client. That
//!    content was put in the cache at start-up by a client with the private account's
//!    credentials; the fuzzed client never has them (the fake compares only their hash);
//! 4. the connection ends once the client is gone, and background work finishes.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use stowage::http_util::{full, Body, BoxError};
use stowage::ingress::Listener;
use stowage::oci::{Algorithm, Digest};
use stowage::settings::Config;
use stowage::upstream::Transport;
use stowage::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod stale;
use stale::remove_stale;

pub fn sha256(b: &[u8]) -> Digest {
    Digest::from_bytes(
        Algorithm::Sha256,
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref(),
    )
}

fn sha256_hex(b: &[u8]) -> String {
    sha256(b).hex().to_owned()
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Repositories every fake registry holds. `team/private` needs the private account.
pub const PUBLIC_REPOS: &[&str] = &["library/alpine", "pub/app", "pub/liar", "pub/redirect"];
pub const PRIVATE_REPO: &str = "team/private";

/// Hosts the harness pins (to TEST-NET-1: never connected, the fake carries everything).
const PINNED: &[&str] = &[
    "registry-1.docker.io",
    "auth.docker.io",
    "quay.io",
    "gcr.io",
    "k8s.gcr.io",
    "registry.k8s.io",
    "ghcr.io",
    "registry.fuzz",
    "auth.fuzz",
    "plain.fuzz",
    "storage.fuzz",
];

/// What a repository serves.
struct Repo {
    private: bool,
    /// tag → (media type, manifest bytes)
    tags: HashMap<String, (String, Bytes)>,
    /// digest → (media type, bytes): manifests by digest
    manifests: HashMap<Digest, (String, Bytes)>,
    blobs: HashMap<Digest, Bytes>,
}

/// The secrets of the private account. Derived, never compared in the clear (the fuzzer
/// could learn a plain comparison from libFuzzer's compare hooks).
struct Secrets {
    basic_hash: String,
    token: String,
    token_hash: String,
}

pub struct Fake {
    repos: HashMap<&'static str, Repo>,
    /// Content the storage host serves (redirect targets), by hex digest.
    storage: HashMap<String, Bytes>,
    secrets: Secrets,
}

fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": sha256(bytes).to_string(), "size": bytes.len()})
}

/// An image: config + layers, as an OCI manifest, a Docker v2 manifest, an OCI index and a
/// Docker manifest list over them.
struct Image {
    oci: Bytes,
    docker: Bytes,
    index: Bytes,
    list: Bytes,
    blobs: Vec<Bytes>,
}

fn image(name: &str, layers: &[Bytes], annotation: &str) -> Image {
    let config = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| sha256(l).to_string()).collect::<Vec<_>>()},
            "history": [{"created": "2026-01-01T00:00:00Z", "created_by": format!("fuzz image {name}")}]
        }))
        .unwrap(),
    );
    let oci = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config),
            "layers": layers.iter().map(|l| descriptor(OCI_LAYER, l)).collect::<Vec<_>>(),
            "annotations": {"org.opencontainers.image.description": annotation}
        }))
        .unwrap(),
    );
    let docker = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": descriptor(DOCKER_CONFIG, &config),
            "layers": layers.iter().map(|l| descriptor(DOCKER_LAYER, l)).collect::<Vec<_>>()
        }))
        .unwrap(),
    );
    let platform = serde_json::json!({"architecture": "amd64", "os": "linux"});
    let mut oci_entry = descriptor(OCI_MANIFEST, &oci);
    oci_entry["platform"] = platform.clone();
    let index = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [oci_entry]
        }))
        .unwrap(),
    );
    let mut docker_entry = descriptor(DOCKER_MANIFEST, &docker);
    docker_entry["platform"] = platform;
    let list = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [docker_entry]
        }))
        .unwrap(),
    );
    let mut blobs = vec![config];
    blobs.extend(layers.iter().cloned());
    Image {
        oci,
        docker,
        index,
        list,
        blobs,
    }
}

fn repo_of(img: &Image, private: bool) -> Repo {
    let mut tags = HashMap::new();
    tags.insert("latest".into(), (OCI_INDEX.into(), img.index.clone()));
    tags.insert("oci".into(), (OCI_MANIFEST.into(), img.oci.clone()));
    tags.insert("v1".into(), (DOCKER_MANIFEST.into(), img.docker.clone()));
    tags.insert("list".into(), (DOCKER_LIST.into(), img.list.clone()));
    let mut manifests = HashMap::new();
    for (t, b) in [
        (OCI_INDEX, &img.index),
        (OCI_MANIFEST, &img.oci),
        (DOCKER_MANIFEST, &img.docker),
        (DOCKER_LIST, &img.list),
    ] {
        manifests.insert(sha256(b), (t.to_owned(), b.clone()));
    }
    Repo {
        private,
        tags,
        manifests,
        blobs: img.blobs.iter().map(|b| (sha256(b), b.clone())).collect(),
    }
}

/// 32 hex characters no input can know: the private content is this, repeated.
pub fn marker() -> &'static [u8] {
    static M: OnceLock<Vec<u8>> = OnceLock::new();
    M.get_or_init(|| {
        sha256_hex(b"stowage fuzz: private marker")[..32]
            .as_bytes()
            .to_vec()
    })
}

/// The private account: `Basic <base64(alice:<secret>)>`.
pub fn alice_basic() -> String {
    use std::fmt::Write;
    let secret = &sha256_hex(b"stowage fuzz: alice's password")[..24];
    let raw = format!("alice:{secret}");
    // base64 by hand: no extra dependency for one header.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = raw.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    let mut s = String::new();
    write!(s, "Basic {out}").unwrap();
    s
}

impl Fake {
    fn new() -> Fake {
        let public_layer = Bytes::from(b"public layer bytes; ".repeat(64));
        let second_layer = Bytes::from(
            (0..3000u32)
                .map(|i| (i * 7 % 251) as u8)
                .collect::<Vec<_>>(),
        );
        let public = image(
            "public",
            &[public_layer.clone(), second_layer],
            "public image",
        );
        let private_layer = Bytes::from(marker().repeat(96));
        let private_annotation = String::from_utf8(marker().repeat(2)).unwrap();
        let private = image("private", &[private_layer], &private_annotation);

        let mut repos = HashMap::new();
        repos.insert("library/alpine", repo_of(&public, false));
        repos.insert("pub/app", repo_of(&public, false));
        repos.insert("pub/redirect", repo_of(&public, false));
        // A registry that lies: blobs and tagged manifests that do not hash to their digests.
        let mut liar = repo_of(&public, false);
        for b in liar.blobs.values_mut() {
            let mut v = b.to_vec();
            if let Some(last) = v.last_mut() {
                *last ^= 1;
            }
            *b = Bytes::from(v);
        }
        for (_, b) in liar.manifests.values_mut() {
            *b = Bytes::from([b.as_ref(), b" "].concat());
        }
        repos.insert("pub/liar", liar);
        repos.insert(PRIVATE_REPO, repo_of(&private, true));

        let storage = public
            .blobs
            .iter()
            .map(|b| (sha256_hex(b), b.clone()))
            .collect();
        let token = sha256_hex(b"stowage fuzz: alice's token");
        Fake {
            repos,
            storage,
            secrets: Secrets {
                basic_hash: sha256_hex(alice_basic().as_bytes()),
                token_hash: sha256_hex(format!("Bearer {token}").as_bytes()),
                token,
            },
        }
    }

    fn is_alice(&self, auth: Option<&HeaderValue>) -> bool {
        let Some(a) = auth else { return false };
        let h = sha256_hex(a.as_bytes());
        h == self.secrets.basic_hash || h == self.secrets.token_hash
    }

    fn answer(&self, req: &Request<Body>) -> Response<Body> {
        let host = req.uri().host().unwrap_or("").to_ascii_lowercase();
        let path = req.uri().path();
        let auth = req.headers().get(AUTHORIZATION);
        let alice = self.is_alice(auth);
        let anon_token = auth.is_some_and(|a| a.as_bytes() == b"Bearer anonymous-token");
        if host == "storage.fuzz" {
            return match path.strip_prefix("/b/").and_then(|h| self.storage.get(h)) {
                Some(b) => bytes(req, StatusCode::OK, "application/octet-stream", b.clone()),
                None => status(StatusCode::FORBIDDEN),
            };
        }
        if path == "/token" {
            let token = if alice {
                self.secrets.token.clone()
            } else if auth.is_some() {
                return status(StatusCode::UNAUTHORIZED);
            } else {
                "anonymous-token".to_owned()
            };
            let body =
                serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
            return bytes(
                req,
                StatusCode::OK,
                "application/json",
                Bytes::from(body.to_string()),
            );
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return status(StatusCode::NOT_FOUND);
        };
        let realm = if host == "registry-1.docker.io" {
            "https://auth.docker.io/token"
        } else {
            "https://auth.fuzz/token"
        };
        let challenge = |scope: &str| {
            let mut r = registry_json(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
            let v = format!("Bearer realm=\"{realm}\",service=\"{host}\",scope=\"{scope}\"");
            if let Ok(v) = HeaderValue::from_str(&v) {
                r.headers_mut().insert(WWW_AUTHENTICATE, v);
            }
            r
        };
        if rest.is_empty() {
            return if alice || anon_token {
                bytes(
                    req,
                    StatusCode::OK,
                    "application/json",
                    Bytes::from_static(b"{}"),
                )
            } else {
                challenge("")
            };
        }
        let (name, kind, reference) =
            match (rest.rsplit_once("/manifests/"), rest.rsplit_once("/blobs/")) {
                (Some((n, r)), _) => (n, "manifests", r),
                (None, Some((n, r))) => (n, "blobs", r),
                _ => return registry_json(StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            };
        let Some(repo) = self.repos.get(name) else {
            return challenge(&format!("repository:{name}:pull"));
        };
        let allowed = if repo.private {
            alice
        } else {
            alice || anon_token
        };
        if !allowed {
            return challenge(&format!("repository:{name}:pull"));
        }
        if kind == "manifests" {
            let found = match reference.parse::<Digest>() {
                Ok(d) => repo.manifests.get(&d).cloned(),
                Err(_) => repo.tags.get(reference).cloned(),
            };
            let Some((media_type, body)) = found else {
                return registry_json(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
            };
            let mut r = bytes(req, StatusCode::OK, &media_type, body.clone());
            let digest = if name == "pub/liar" {
                // The tag's digest announced for bytes that are not it.
                sha256(&body[..body.len() - 1])
            } else {
                sha256(&body)
            };
            r.headers_mut().insert(
                "docker-content-digest",
                HeaderValue::from_str(&digest.to_string()).unwrap(),
            );
            return r;
        }
        let Ok(digest) = reference.parse::<Digest>() else {
            return registry_json(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
        };
        let Some(blob) = repo.blobs.get(&digest) else {
            return registry_json(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
        };
        if name == "pub/redirect" {
            let mut r = status(StatusCode::TEMPORARY_REDIRECT);
            let to = format!("https://storage.fuzz/b/{}", digest.hex());
            r.headers_mut()
                .insert(LOCATION, HeaderValue::from_str(&to).unwrap());
            return r;
        }
        let mut r = bytes(
            req,
            StatusCode::OK,
            "application/octet-stream",
            blob.clone(),
        );
        r.headers_mut().insert(
            "docker-content-digest",
            HeaderValue::from_str(&digest.to_string()).unwrap(),
        );
        r
    }
}

fn status(s: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = s;
    r
}

fn registry_json(s: StatusCode, code: &str) -> Response<Body> {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"fake"}}]}}"#);
    let mut r = Response::new(full(body));
    *r.status_mut() = s;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn bytes(req: &Request<Body>, s: StatusCode, content_type: &str, body: Bytes) -> Response<Body> {
    let len = body.len();
    let mut r = Response::new(full(if req.method() == Method::HEAD {
        Bytes::new()
    } else {
        body
    }));
    *r.status_mut() = s;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
    r.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len as u64));
    r
}

impl Transport for Fake {
    fn send(
        &self,
        req: Request<Body>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>> {
        let r = if req.uri().host().is_some_and(|h| PINNED.contains(&h)) {
            Ok(self.answer(&req))
        } else {
            Err(BoxError::from("the fake upstream knows no such host"))
        };
        Box::pin(async move { r })
    }
}

pub struct Harness {
    rt: tokio::runtime::Runtime,
    server: Server,
    cache_dir: PathBuf,
    /// Files already checked (name → length): objects are immutable once in place.
    checked: Mutex<HashMap<PathBuf, u64>>,
    /// Every 16-byte run of the private marker (repeated). Looked up by hash, never
    /// compared byte by byte: libFuzzer records `memcmp` arguments and would learn it.
    needles: HashSet<[u8; 16]>,
}

const PEER: &str = "192.0.2.77:40000";
const LOCAL: &str = "192.0.2.1:3128";

fn config_toml(dir: &Path) -> String {
    let pins: String = PINNED
        .iter()
        .map(|h| format!("\"{h}\" = \"192.0.2.10\"\n"))
        .collect();
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
other_hosts = "deny"
tunnel_ports = []
header_timeout = "5s"
idle_timeout = "10s"
shutdown_grace = "1s"
max_connections = 1024

[ca]
dir = "{dir}/ca"

[cache]
dir = "{dir}/cache"
max_size = "256MiB"
min_free = "0B"
max_manifest_size = "64KiB"
manifest_ttl = "1m"

[upstream]
connect_timeout = "2s"
response_timeout = "5s"
idle_timeout = "5s"
max_redirects = 3

[upstream.resolve]
{pins}

[[registry]]
host = "registry.fuzz"
auth_hosts = ["auth.fuzz"]

[[registry]]
host = "http://plain.fuzz"

[mirror]
tls = "off"
default_registry = "registry.fuzz"
"#,
        dir = dir.display()
    )
}

/// The harness, built on first use.
pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let base = ["/dev/shm", "/tmp"]
            .into_iter()
            .find(|p| Path::new(p).is_dir())
            .unwrap();
        remove_stale(Path::new(base));
        let dir = Path::new(base).join(format!("stowage-fuzz-request-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = Config::from_toml_str(&config_toml(&dir)).expect("harness config");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let fake = Fake::new();
        if std::env::var_os("STOWAGE_FUZZ_LIST").is_some() {
            // For writing seeds: what each repository holds.
            for (name, repo) in &fake.repos {
                for (tag, (t, b)) in &repo.tags {
                    eprintln!("tag {name} {tag} {} {t}", sha256(b));
                }
                for d in repo.blobs.keys() {
                    eprintln!("blob {name} {d}");
                }
            }
        }
        let server = rt
            .block_on(Server::bind_with_transport(config, Arc::new(fake)))
            .expect("server binds");
        let m = marker();
        let doubled = [m, m].concat();
        let needles = (0..m.len())
            .map(|i| doubled[i..i + 16].try_into().unwrap())
            .collect();
        let h = Harness {
            rt,
            server,
            cache_dir: dir.join("cache"),
            checked: Mutex::new(HashMap::new()),
            needles,
        };
        h.seed_private();
        h
    })
}

impl Harness {
    /// The private account pulls its image once, over plain HTTP through the proxy (the
    /// only way in where a client's own `Authorization` goes upstream), so its objects are
    /// in the cache before any input runs.
    fn seed_private(&self) {
        let fake = Fake::new();
        let repo = &fake.repos[PRIVATE_REPO];
        let auth = alice_basic();
        let mut paths = vec![format!("/v2/{PRIVATE_REPO}/manifests/oci")];
        paths.extend(
            repo.blobs
                .keys()
                .map(|d| format!("/v2/{PRIVATE_REPO}/blobs/{d}")),
        );
        let mut reqs = Vec::new();
        for p in &paths {
            reqs.extend_from_slice(
                format!("GET http://plain.fuzz{p} HTTP/1.1\r\nHost: plain.fuzz\r\nAuthorization: {auth}\r\nAccept: {OCI_MANIFEST}\r\n\r\n")
                    .as_bytes(),
            );
        }
        let out = self.exchange(Listener::Proxy, &reqs);
        assert!(
            self.leaks(&out),
            "seeding: the private account did not get its image"
        );
        let private_blobs = repo.blobs.keys().filter(|d| {
            self.cache_dir
                .join("blobs/sha256")
                .join(&d.hex()[..2])
                .join(d.hex())
                .is_file()
        });
        assert_eq!(
            private_blobs.count(),
            repo.blobs.len(),
            "seeding: private blobs not cached"
        );
        self.check_store();
    }

    /// Sends `input` on one connection, returns everything Stowage sent back.
    fn exchange(&self, kind: Listener, input: &[u8]) -> Vec<u8> {
        let peer: SocketAddr = PEER.parse().unwrap();
        let local: SocketAddr = LOCAL.parse().unwrap();
        self.rt.block_on(async {
            let (client, server_io) = tokio::io::duplex(64 * 1024);
            let conn = tokio::spawn(self.server.serve_connection(kind, server_io, peer, local));
            let (mut rd, mut wr) = tokio::io::split(client);
            let mut out = Vec::new();
            let exchange = async {
                let write = async {
                    let _ = wr.write_all(input).await;
                    // Keep the write side open: the server ends the connection itself
                    // (header or idle timeout, on paused time) after its last answer.
                    std::future::pending::<()>().await
                };
                let read = async {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match rd.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if out.len() < (16 << 20) {
                                    out.extend_from_slice(&buf[..n]);
                                }
                            }
                        }
                    }
                };
                tokio::select! {
                    () = write => {}
                    () = read => {}
                }
            };
            // Ten virtual minutes: far beyond every timeout in the configuration.
            let _ = tokio::time::timeout(Duration::from_secs(600), exchange).await;
            drop((rd, wr));
            match tokio::time::timeout(Duration::from_secs(600), conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
                Err(_) => panic!("the connection outlived its client by ten minutes"),
            }
            // Background work the input started (fills, probes, tunnels) settles.
            let mut waited = Duration::ZERO;
            while self.server.tasks_in_flight() > 0 {
                assert!(
                    waited < Duration::from_secs(600),
                    "{} background tasks still running ten minutes after the connection",
                    self.server.tasks_in_flight()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
                waited += Duration::from_millis(10);
            }
            out
        })
    }

    fn leaks(&self, out: &[u8]) -> bool {
        out.windows(16)
            .any(|w| self.needles.contains(<&[u8; 16]>::try_from(w).unwrap()))
    }

    /// Every stored object hashes to its name.
    fn check_store(&self) {
        let mut checked = self.checked.lock().unwrap();
        let root = self.cache_dir.join("blobs");
        for alg in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            for fan in std::fs::read_dir(alg.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                for obj in std::fs::read_dir(fan.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let path = obj.path();
                    let Ok(meta) = obj.metadata() else { continue };
                    if checked.get(&path) == Some(&meta.len()) {
                        continue;
                    }
                    let Ok(bytes) = std::fs::read(&path) else {
                        continue;
                    };
                    let name = obj.file_name().to_string_lossy().into_owned();
                    let alg_name = alg.file_name().to_string_lossy().into_owned();
                    assert_eq!(alg_name, "sha256", "unexpected algorithm directory");
                    assert_eq!(
                        sha256_hex(&bytes),
                        name,
                        "cached object {} does not hash to its name",
                        path.display()
                    );
                    assert_eq!(&name[..2], fan.file_name().to_string_lossy());
                    checked.insert(path, meta.len());
                }
            }
        }
    }

    /// One fuzz input: `input` on a connection to `kind`, then the checks.
    pub fn run(&self, kind: Listener, input: &[u8]) {
        let out = self.exchange(kind, input);
        assert!(
            !self.leaks(&out),
            "the private repository's content was sent to a client without its credentials:\n{}",
            String::from_utf8_lossy(&out[..out.len().min(4096)])
        );
        self.check_store();
    }
}
