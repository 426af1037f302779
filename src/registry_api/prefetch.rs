//! Prefetch: filling the cache with an image before anyone pulls it (`stowage prefetch`,
//! `[prefetch] images`).
//!
//! Every request a prefetch makes is a [`RegistryApi::serve`] of the `GET` a client would
//! send, so it takes the clients' path exactly: repository filters (a denied repository
//! fails with the `DENIED` reason), the negative cache, tag rows and history, coalesced
//! fills (a client pulling the same blob meanwhile shares the one download), digest
//! verification and the access grants. The tag is revalidated upstream (`no-cache`);
//! what the cache already holds is not fetched again, so a rerun fetches what changed.
//!
//! Credentials given for one prefetch ([`Target::account`]) answer that registry's
//! challenges and nothing else; they are neither logged nor kept after it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HOST};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{RegistryApi, Target};
use crate::http_util::{collect_limited, empty, Body, DOCKER_CONTENT_DIGEST};
use crate::oci::{Digest, ImageRef, Platform, Reference, Registry, Route};
use crate::settings::Credentials;
use crate::upstream::token_auth::Account;

/// Every manifest type a prefetch accepts: an index when the tag is one.
const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.list.v2+json,application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json";

/// Blobs of one image fetched at once.
const CONCURRENT_BLOBS: usize = 3;

/// At most one progress event per image this often while bytes flow.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Which manifests of an index a prefetch takes.
#[derive(Clone, Debug)]
pub enum Platforms {
    /// Every platform the index lists (attestations, `unknown/unknown`, aside).
    All,
    /// These.
    Only(Vec<Platform>),
}

/// What a prefetch reports while it runs: for `POST /admin/prefetch`, one JSON line each.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PrefetchEvent {
    /// The image is resolved: what it takes, in all.
    Resolved {
        image: String,
        digest: String,
        platforms: Vec<String>,
        layers: u64,
        bytes: u64,
    },
    /// Bytes and layers done so far (cached ones count as done).
    Progress {
        image: String,
        bytes: u64,
        layers_done: u64,
    },
    Done(PrefetchReport),
    Failed {
        image: String,
        reason: String,
    },
    /// Nothing new, still working (the client tells a long download from a stuck server).
    Working,
}

/// One image prefetched.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrefetchReport {
    pub image: String,
    /// What the reference resolved to (the index, for a multi-platform image).
    pub digest: String,
    /// The platforms taken from the index; empty for a single-platform manifest.
    pub platforms: Vec<String>,
    /// Distinct layers of those platforms.
    pub layers: u64,
    /// Bytes of every manifest, config and layer of those platforms.
    pub bytes: u64,
    /// Of those, the bytes that came from upstream now (the rest was cached already).
    pub fetched_bytes: u64,
    pub seconds: f64,
}

/// A blob of the image: config or layer.
#[derive(Clone)]
struct BlobRef {
    digest: Digest,
    size: u64,
    layer: bool,
}

/// Shared progress of one image.
struct Progress<'a> {
    image: String,
    bytes: AtomicU64,
    fetched: AtomicU64,
    layers_done: AtomicU64,
    last: Mutex<Instant>,
    events: &'a (dyn Fn(PrefetchEvent) + Send + Sync),
}

impl Progress<'_> {
    fn report(&self, force: bool) {
        {
            let mut last = self.last.lock().expect("progress lock");
            if !force && last.elapsed() < PROGRESS_EVERY {
                return;
            }
            *last = Instant::now();
        }
        (self.events)(PrefetchEvent::Progress {
            image: self.image.clone(),
            bytes: self.bytes.load(Relaxed),
            layers_done: self.layers_done.load(Relaxed),
        });
    }
}

impl RegistryApi {
    /// Prefetches `image`: resolves it, picks `platforms` from an index, and fills every
    /// manifest, config and layer through [`RegistryApi::serve`]. `creds`, if given, are
    /// used for this registry's upstream authentication only. `events` hears the progress
    /// (and the `Done` or `Failed` that ends it); the result says the same.
    pub async fn prefetch(
        self: &Arc<Self>,
        image: &ImageRef,
        platforms: &Platforms,
        creds: Option<Credentials>,
        events: &(dyn Fn(PrefetchEvent) + Send + Sync),
    ) -> Result<PrefetchReport, String> {
        let started = Instant::now();
        let name = image.to_string();
        let result = self
            .prefetch_inner(image, platforms, creds, events, started)
            .await;
        events(match &result {
            Ok(r) => PrefetchEvent::Done(r.clone()),
            Err(reason) => PrefetchEvent::Failed {
                image: name,
                reason: reason.clone(),
            },
        });
        result
    }

    async fn prefetch_inner(
        self: &Arc<Self>,
        image: &ImageRef,
        platforms: &Platforms,
        creds: Option<Credentials>,
        events: &(dyn Fn(PrefetchEvent) + Send + Sync),
        started: Instant,
    ) -> Result<PrefetchReport, String> {
        let registry = image.repo.registry.clone();
        // The account's `Authorization` is the request's stand-in credential: what this
        // prefetch is granted is granted to it, not to anonymous clients.
        let stand_in = creds.as_ref().map(Credentials::basic);
        let account = creds.map(|c| {
            Arc::new(Account::new(
                c,
                registry.clone(),
                self.auth_hosts_of(&registry),
            ))
        });
        let target = Arc::new(Target {
            registry,
            auth_host: false,
            answers_challenges: true,
            account,
        });
        let get = |route: Route, no_cache: bool| {
            let target = target.clone();
            let stand_in = stand_in.clone();
            async move {
                let manifest = matches!(route, Route::Manifest { .. });
                let mut b = Request::builder()
                    .method(Method::GET)
                    .uri(route.path().expect("a blob or manifest route"))
                    .header(HOST, target.registry.authority());
                if manifest {
                    b = b.header(ACCEPT, ACCEPT_ALL);
                }
                if no_cache {
                    b = b.header(CACHE_CONTROL, "no-cache");
                }
                if let Some(v) = stand_in {
                    b = b.header(AUTHORIZATION, v);
                }
                let req = b.body(empty()).expect("valid request");
                self.serve(target, req).await
            }
        };
        let repo = &image.repo.repo;
        let limit = self.cache.limits.max_manifest_size as usize;

        let manifest = |reference: Reference| Route::Manifest {
            name: repo.clone(),
            reference,
        };
        // The reference: a tag is asked of upstream now.
        let is_tag = matches!(image.reference, Reference::Tag(_));
        let top = get(manifest(image.reference.clone()), is_tag).await;
        let (top_digest, top_type, top_body) = self.manifest_body(top, limit).await?;
        let mut manifests: Vec<Value> = Vec::new();
        let mut chosen = Vec::new();
        let mut bytes = top_body.len() as u64;
        let top_json: Value = serde_json::from_slice(&top_body)
            .map_err(|e| format!("the manifest is not JSON: {e}"))?;
        if is_index(&top_type, &top_json) {
            let entries = top_json["manifests"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut offered = Vec::new();
            for e in &entries {
                let p = &e["platform"];
                let (os, arch) = (
                    p["os"].as_str().unwrap_or(""),
                    p["architecture"].as_str().unwrap_or(""),
                );
                let variant = p["variant"].as_str();
                if os.is_empty() || os == "unknown" || arch == "unknown" {
                    continue; // attestations and entries without a platform
                }
                let shown = match variant {
                    Some(v) if !v.is_empty() => format!("{os}/{arch}/{v}"),
                    _ => format!("{os}/{arch}"),
                };
                offered.push(shown.clone());
                let take = match platforms {
                    Platforms::All => true,
                    Platforms::Only(list) => list.iter().any(|w| w.matches(os, arch, variant)),
                };
                if take {
                    let digest: Digest = e["digest"]
                        .as_str()
                        .and_then(|d| d.parse().ok())
                        .ok_or_else(|| format!("the index lists a bad digest for {shown}"))?;
                    chosen.push((shown, digest));
                }
            }
            if chosen.is_empty() {
                let asked = match platforms {
                    Platforms::All => "any platform".to_owned(),
                    Platforms::Only(l) => l
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                };
                return Err(format!(
                    "the index has no manifest for {asked} (it has: {})",
                    if offered.is_empty() {
                        "none".to_owned()
                    } else {
                        offered.join(", ")
                    }
                ));
            }
            for (shown, digest) in &chosen {
                let r = get(manifest(Reference::Digest(digest.clone())), false).await;
                let (_, _, body) = self
                    .manifest_body(r, limit)
                    .await
                    .map_err(|e| format!("{shown} manifest {digest}: {e}"))?;
                let json: Value = serde_json::from_slice(&body)
                    .map_err(|e| format!("{shown} manifest {digest} is not JSON: {e}"))?;
                bytes += body.len() as u64;
                manifests.push(json);
            }
        } else {
            manifests.push(top_json);
        }

        // Configs and layers, each once.
        let mut blobs: Vec<BlobRef> = Vec::new();
        for m in &manifests {
            let config = m["config"].clone();
            let layers = m["layers"].as_array().cloned().unwrap_or_default();
            if config.is_null() {
                return Err(
                    "the manifest names no config (not an OCI or Docker v2 image manifest)".into(),
                );
            }
            for (d, layer) in
                std::iter::once((&config, false)).chain(layers.iter().map(|l| (l, true)))
            {
                let digest: Digest = d["digest"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or("the manifest lists a bad digest")?;
                if blobs.iter().any(|b| b.digest == digest) {
                    continue;
                }
                blobs.push(BlobRef {
                    digest,
                    size: d["size"].as_u64().unwrap_or(0),
                    layer,
                });
            }
        }
        bytes += blobs.iter().map(|b| b.size).sum::<u64>();
        let layers = blobs.iter().filter(|b| b.layer).count() as u64;
        let shown: Vec<String> = chosen.iter().map(|(s, _)| s.clone()).collect();
        events(PrefetchEvent::Resolved {
            image: image.to_string(),
            digest: top_digest.to_string(),
            platforms: shown.clone(),
            layers,
            bytes,
        });
        let progress = Progress {
            image: image.to_string(),
            bytes: AtomicU64::new(bytes - blobs.iter().map(|b| b.size).sum::<u64>()),
            fetched: AtomicU64::new(0),
            layers_done: AtomicU64::new(0),
            last: Mutex::new(Instant::now()),
            events,
        };
        let progress = &progress;
        let results: Vec<Result<(), String>> = futures_util::stream::iter(blobs)
            .map(|b| {
                let get = &get;
                async move {
                    if self.cache.store.index.get(&b.digest).is_none() {
                        let r = get(
                            Route::Blob {
                                name: repo.clone(),
                                digest: b.digest.clone(),
                            },
                            false,
                        )
                        .await;
                        self.drain_blob(r, &b.digest, progress).await?;
                    } else {
                        progress.bytes.fetch_add(b.size, Relaxed);
                    }
                    if b.layer {
                        progress.layers_done.fetch_add(1, Relaxed);
                    }
                    progress.report(true);
                    Ok(())
                }
            })
            .buffer_unordered(CONCURRENT_BLOBS)
            .collect()
            .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(e);
        }
        Ok(PrefetchReport {
            image: image.to_string(),
            digest: top_digest.to_string(),
            platforms: shown,
            layers,
            bytes,
            fetched_bytes: progress.fetched.load(Relaxed),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The configured auth hosts of `registry` (where a `--creds` account may go besides
    /// the registry itself).
    fn auth_hosts_of(&self, registry: &Registry) -> Vec<Registry> {
        self.accounts
            .auth_hosts
            .iter()
            .filter(|(_, regs)| regs.contains(registry))
            .map(|(auth, _)| auth.clone())
            .collect()
    }

    /// A manifest answer's digest, media type and bytes, or why there are none.
    async fn manifest_body(
        &self,
        resp: Response<Body>,
        limit: usize,
    ) -> Result<(Digest, String, Bytes), String> {
        if resp.status() != StatusCode::OK {
            return Err(refusal(resp).await);
        }
        let digest = resp
            .headers()
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        let idle = self.upstream.idle_timeout();
        let body = tokio::time::timeout(idle, collect_limited(resp.into_body(), limit))
            .await
            .map_err(|_| format!("the manifest stalled for {}s", idle.as_secs()))?
            .map_err(|e| format!("reading the manifest: {e:?}"))?;
        let digest = digest.unwrap_or_else(|| {
            Digest::from_bytes(
                crate::oci::Algorithm::Sha256,
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body).as_ref(),
            )
        });
        Ok((digest, media_type, body))
    }

    /// Reads a blob answer to its end (the fill behind it stores it), counting bytes.
    async fn drain_blob(
        &self,
        resp: Response<Body>,
        digest: &Digest,
        progress: &Progress<'_>,
    ) -> Result<(), String> {
        if resp.status() != StatusCode::OK {
            return Err(format!("blob {digest}: {}", refusal(resp).await));
        }
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("blob {digest}: {e}"))?;
            if let Some(d) = frame.data_ref() {
                progress.bytes.fetch_add(d.len() as u64, Relaxed);
                progress.fetched.fetch_add(d.len() as u64, Relaxed);
                progress.report(false);
            }
        }
        // The fill renames the verified file into place as the last byte goes out.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.cache.store.index.get(digest).is_none() {
            if Instant::now() > deadline {
                return Err(format!(
                    "blob {digest} was served but not cached (caching paused, or the fill limit reached)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

fn is_index(media_type: &str, json: &Value) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.index.v1+json"
            | "application/vnd.docker.distribution.manifest.list.v2+json"
    ) || (json.get("manifests").is_some() && json.get("layers").is_none())
}

/// Why an answer is not the object: its status and the registry error's code and message.
async fn refusal(resp: Response<Body>) -> String {
    let status = resp.status();
    let body = tokio::time::timeout(
        Duration::from_secs(5),
        collect_limited(resp.into_body(), 64 << 10),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or_default();
    let detail = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        let e = v["errors"].get(0)?.clone();
        Some(format!(
            "{}: {}",
            e["code"].as_str().unwrap_or("?"),
            e["message"].as_str().unwrap_or("")
        ))
    });
    match detail {
        Some(d) => format!("{status}: {d}"),
        None => format!("upstream answered {status}"),
    }
}

/// `[prefetch] images`: prefetched at start-up and every `interval` until `shutdown`,
/// one log line per image.
pub async fn keep_warm(
    api: Arc<RegistryApi>,
    images: Vec<ImageRef>,
    platforms: Vec<Platform>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let platforms = Platforms::Only(platforms);
    loop {
        let round = async {
            for image in &images {
                match api.prefetch(image, &platforms, None, &|_| {}).await {
                    Ok(r) => tracing::info!(
                        image = %r.image,
                        digest = %r.digest,
                        platforms = %r.platforms.join(","),
                        layers = r.layers,
                        bytes = r.bytes,
                        fetched_bytes = r.fetched_bytes,
                        seconds = (r.seconds * 10.0).round() / 10.0,
                        "prefetch: image kept warm"
                    ),
                    Err(reason) => {
                        tracing::warn!(image = %image, %reason, "prefetch: image not kept warm")
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = round => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
