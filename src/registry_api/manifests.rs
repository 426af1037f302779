//! Manifests: by digest (immutable: stored once fetched and verified, with the media type
//! kept) and by tag (a row per `Accept` variant with a TTL; revalidated with `HEAD`, which
//! Docker Hub does not count against pull limits; served stale when upstream fails).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, WARNING};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use super::errors::revalidation_answer;
use super::errors::ServeError;
use super::{
    authorize, blobs::verified_relay, fetch_uncached, path_and_query, relay, serve_stored,
    upstream_fetch, Object, RegistryApi, Served, Stored, Target,
};
use crate::access::UpstreamNow;
use crate::cache::{StoreError, TagRow, TagVariant};
use crate::clock::now_ms;
use crate::http_util::{
    collect_limited, full, set_len, strip_hop_by_hop, Body, CollectError, DOCKER_CONTENT_DIGEST,
};
use crate::oci::{Algorithm, Digest, RepoName, Tag, TagKey};
use crate::telemetry::CacheStatus;
use crate::upstream::{credential_id, UpstreamError};
use http::Response;

/// A stored manifest (bytes and media type), from the store's hot rows when it was served
/// lately. Synchronous, as blob hits and tag lookups are: a memory lookup, or on a miss a
/// redb read and a small file, costs less than a hop to the blocking pool.
pub(super) fn stored_manifest(
    api: &RegistryApi,
    digest: &Digest,
) -> Option<Arc<crate::cache::StoredManifest>> {
    api.cache.store.manifest(digest).ok()?
}

pub(super) async fn manifest_by_digest(
    api: &Arc<RegistryApi>,
    target: &Arc<Target>,
    req: Request<Body>,
    repo: &RepoName,
    digest: &Digest,
) -> Served {
    let method = req.method().clone();
    let pq = path_and_query(&req).to_owned();
    if let Some(stored) = stored_manifest(api, digest) {
        let len = stored.bytes.len() as u64;
        let authorized = match authorize(
            api,
            target,
            repo,
            digest,
            Object::Manifest,
            req.headers(),
            UpstreamNow::Ask,
            Some(len),
        )
        .await
        {
            Ok(a) => a,
            Err(refused) => return (CacheStatus::Hit, Ok(refused)),
        };
        return (
            CacheStatus::Hit,
            serve_stored(
                authorized,
                Stored::Memory(stored.bytes.clone()),
                len,
                &stored.media_type,
                &method,
                None,
            ),
        );
    }
    if method == Method::HEAD {
        return fetch_uncached(api, target, req).await;
    }
    match fetch_manifest(api, target, &pq, req.headers(), Some(digest)).await {
        Ok(Fetch::Stored(resp, _)) => {
            record_pending_tags(api, target, repo, digest).await;
            let credential = credential_id(req.headers());
            api.upstream_served(target, &target.repo(repo), Some(digest), credential, pq);
            (CacheStatus::Miss, Ok(resp))
        }
        Ok(Fetch::Relayed(resp)) => (CacheStatus::Miss, Ok(resp)),
        Err(e) => (CacheStatus::Miss, Err(e)),
    }
}

/// Manifest fills verify in memory before they store, and the response is sent from that
/// memory: together they may hold this many times `[cache] max_manifest_size`. A manifest
/// that does not fit is relayed as it comes, uncached (by digest, still verified on the way),
/// so a crowd of slow fills cannot grow the process without bound.
const MANIFEST_BUDGET_FILLS: u64 = 16;

/// Budget units are KiB (a semaphore takes at most `u32::MAX` permits at once).
fn kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).clamp(1, u32::MAX as u64) as u32
}

/// The semaphore that bounds buffered manifest bytes (see [`MANIFEST_BUDGET_FILLS`]).
pub(super) fn manifest_budget(max_manifest_size: u64) -> Arc<Semaphore> {
    let permits = u64::from(kib(max_manifest_size)) * MANIFEST_BUDGET_FILLS;
    Arc::new(Semaphore::new(
        permits.min(Semaphore::MAX_PERMITS as u64) as usize
    ))
}

pub(super) enum Fetch {
    /// A verified manifest, stored, with the response to send and its digest.
    Stored(Response<Body>, Digest),
    /// Upstream's answer was not a cacheable manifest; relayed as is.
    Relayed(Response<Body>),
}

/// GETs a manifest upstream, verifies it (against `expected`, or against the
/// `Docker-Content-Digest` upstream sent for a tag), and stores it with its media type.
pub(super) async fn fetch_manifest(
    api: &RegistryApi,
    target: &Target,
    pq: &str,
    headers: &HeaderMap,
    expected: Option<&Digest>,
) -> Result<Fetch, ServeError> {
    let resp = upstream_fetch(api, target, Method::GET, pq, headers, true).await?;
    if resp.status() != StatusCode::OK {
        return Ok(Fetch::Relayed(relay(resp)));
    }
    // Only a manifest is stored as one: a redirect that ends at a login page also answers
    // 200, with HTML.
    let is_manifest = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_manifest_type);
    if !is_manifest {
        return Ok(Fetch::Relayed(relay(resp)));
    }
    let limit = api.cache.limits.max_manifest_size;
    let announced = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Relayed as it comes, uncached; by digest, verified on the way (a mismatch cuts the
    // body short). A tag's digest is not known before the bytes are.
    let pass = |resp| match expected {
        Some(d) => verified_relay(api, resp, d),
        None => relay(resp),
    };
    if announced.is_some_and(|n| n > limit) {
        // Too big to buffer.
        return Ok(Fetch::Relayed(pass(resp)));
    }
    let need = kib(announced.unwrap_or(limit));
    let Ok(permit) = api.manifest_budget.clone().try_acquire_many_owned(need) else {
        tracing::debug!(
            kib = need,
            "manifest buffering budget in use by other fills: relaying this one uncached"
        );
        return Ok(Fetch::Relayed(pass(resp)));
    };
    let (mut parts, body) = resp.into_parts();
    let idle = api.upstream.idle_timeout();
    let bytes: Bytes = match tokio::time::timeout(idle, collect_limited(body, limit as usize)).await
    {
        Err(_) => return Err(UpstreamError::BodyStalled(idle).into()),
        Ok(Err(CollectError::TooLarge)) => return Err(ServeError::ManifestTooLarge(limit)),
        Ok(Err(CollectError::Body(e))) => return Err(UpstreamError::Body(e).into()),
        Ok(Err(CollectError::Stalled(d))) => return Err(UpstreamError::BodyStalled(d).into()),
        Ok(Ok(b)) => b,
    };
    let announced_digest = parts
        .headers
        .get(DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let digest = match (expected, announced_digest) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => d,
        (None, None) => Digest::from_bytes(
            Algorithm::Sha256,
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref(),
        ),
    };
    let media_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let store = api.cache.store.clone();
    let (d, b) = (digest.clone(), bytes.clone());
    let stored = tokio::task::spawn_blocking(move || {
        store.put(&d, &b)?;
        if !media_type.is_empty() {
            store.set_media_type(&d, &media_type)?;
        }
        Ok::<_, StoreError>(())
    })
    .await;
    match stored {
        Ok(Ok(())) => {}
        Ok(Err(StoreError::Mismatch { expected, actual })) => {
            api.metrics.digest_mismatches.inc();
            tracing::error!(%expected, %actual, "manifest digest mismatch: discarded");
            return Err(ServeError::DigestMismatch);
        }
        Ok(Err(e)) => {
            api.metrics.write_error("write");
            tracing::warn!(%digest, error = %e, "manifest verified but not cached")
        }
        Err(e) => tracing::warn!(%digest, error = %e, "manifest store task failed"),
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(
        DOCKER_CONTENT_DIGEST,
        HeaderValue::from_str(&digest.to_string()).expect("ascii"),
    );
    set_len(&mut parts.headers, bytes.len() as u64);
    // The body keeps its share of the budget until it is sent or dropped.
    let body = full(bytes).map_frame(move |frame| {
        let _held = &permit;
        frame
    });
    Ok(Fetch::Stored(
        Response::from_parts(parts, body.boxed_unsync()),
        digest,
    ))
}

/// Whether `content_type` is a manifest or index media type (OCI or Docker): only such a
/// response is stored as a manifest.
pub fn is_manifest_type(content_type: &str) -> bool {
    let t = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    t.starts_with("application/vnd.oci.image.")
        || t.starts_with("application/vnd.docker.distribution.manifest.")
        || t.starts_with("application/vnd.docker.container.image.")
}

/// The media types a client accepts, normalised (sorted, parameters dropped) so the same
/// client always hits the same tag entry.
pub fn accept_key(headers: &HeaderMap) -> String {
    let mut types: Vec<std::borrow::Cow<'_, str>> = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.split(';').next().unwrap_or("").trim())
        .filter(|t| !t.is_empty())
        .map(|t| {
            if t.bytes().any(|b| b.is_ascii_uppercase()) {
                t.to_ascii_lowercase().into()
            } else {
                t.into()
            }
        })
        .collect();
    types.sort();
    types.dedup();
    types.join(",")
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

fn is_index(media_type: &str) -> bool {
    INDEX_TYPES.contains(&media_type)
}

/// Whether a normalised `Accept` list ([`accept_key`]) admits `media_type`: it names it,
/// `*/*` or `application/*`, or names nothing (a client that says nothing takes what it
/// is given).
fn admits(accept: &str, media_type: &str) -> bool {
    accept.is_empty()
        || accept
            .split(',')
            .any(|t| t == media_type || t == "*/*" || t == "application/*")
}

fn admits_index(accept: &str) -> bool {
    INDEX_TYPES.iter().any(|t| admits(accept, t))
}

/// The stored variant of a tag that answers a request accepting `accept`, as upstream
/// would: one whose media type the client accepts, the index when the client takes
/// indexes. A single-platform manifest stands for the tag to a client that takes indexes
/// only if upstream chose it for a client that took indexes too; otherwise the tag may be
/// an index that upstream resolved to one platform for that client, and answering with it
/// would give this client another platform's image.
pub(super) fn negotiate<'a>(row: &'a TagRow, accept: &str) -> Option<&'a TagVariant> {
    if let Some(v) = row.variant(accept) {
        return Some(v);
    }
    let wants_index = admits_index(accept);
    row.variants
        .iter()
        .filter(|v| admits(accept, &v.media_type))
        .filter(|v| is_index(&v.media_type) || !wants_index || admits_index(&v.accept))
        .max_by_key(|v| (is_index(&v.media_type), v.checked_at_ms))
}

/// The key concurrent revalidations of one tag share: the same tag, `Accept` list,
/// credential and way of answering challenges get the same upstream answer.
pub(super) type RevalidationKey = (TagKey, String, [u8; 32], bool);

/// What a revalidation `HEAD` got: its status and headers, or why it failed.
pub(super) type Revalidation = Arc<Result<(StatusCode, HeaderMap), String>>;

/// The revalidation `HEAD` of a stale tag, one upstream request for every concurrent
/// revalidation of the same [`RevalidationKey`] (a fleet whose tags expire together asks
/// once). The answer is shared while it is in flight only: a later revalidation asks anew.
async fn revalidate(
    api: &RegistryApi,
    target: &Target,
    key: &TagKey,
    accept: &str,
    pq: &str,
    headers: &HeaderMap,
) -> Result<Response<Body>, String> {
    let k = (
        key.clone(),
        accept.to_owned(),
        credential_id(headers),
        target.answers_challenges,
    );
    let shared = api
        .revalidations
        .get_with(k.clone(), async {
            let r = upstream_fetch(api, target, Method::HEAD, pq, headers, false).await;
            Arc::new(
                r.map(|r| (r.status(), r.headers().clone()))
                    .map_err(|e| e.to_string()),
            )
        })
        .await;
    api.revalidations.invalidate(&k).await;
    match &*shared {
        Ok((status, headers)) => {
            let mut r = Response::new(crate::http_util::empty());
            *r.status_mut() = *status;
            *r.headers_mut() = headers.clone();
            Ok(r)
        }
        Err(e) => Err(e.clone()),
    }
}

/// A tag resolved with `HEAD` (containerd does this, then fetches by digest): `HEAD` stays
/// `HEAD` upstream, so the manifest is not here yet and the tag cannot be recorded (a tag
/// row is only written once its content is stored). It is recorded now if the content is
/// already stored, else when that manifest is stored by digest within `PENDING_TAG_TTL`.
pub(super) async fn remember_tag_head(
    api: &RegistryApi,
    key: &TagKey,
    accept: String,
    headers: &HeaderMap,
) {
    let Some(digest) = headers
        .get(DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok())
    else {
        return;
    };
    let media_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if media_type.is_empty() {
        return;
    }
    let variant = TagVariant {
        accept,
        digest: digest.clone(),
        media_type,
        checked_at_ms: now_ms(),
    };
    if stored_manifest(api, &digest).is_some() {
        set_tag(api, key.clone(), variant).await;
        return;
    }
    let pending_key = (key.repo.clone(), digest);
    let mut tags = api.pending_tags.get(&pending_key).unwrap_or_default();
    tags.retain(|(k, v)| !(k == key && v.accept == variant.accept));
    tags.push((key.clone(), variant));
    tags.truncate(MAX_PENDING_TAGS);
    api.pending_tags.insert(pending_key, tags);
}

/// Records the tags whose `HEAD` named `digest`, now that it is stored.
pub(super) async fn record_pending_tags(
    api: &RegistryApi,
    target: &Target,
    repo: &RepoName,
    digest: &Digest,
) {
    let pending_key = (target.repo(repo), digest.clone());
    if let Some(tags) = api.pending_tags.remove(&pending_key) {
        for (key, variant) in tags {
            set_tag(api, key, variant).await;
        }
    }
}

pub(super) async fn set_tag(api: &RegistryApi, key: TagKey, variant: TagVariant) {
    let store = api.cache.store.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.set_tag(&key, variant)).await {
        tracing::warn!(error = %e, "tag not recorded");
    }
}

/// Tags resolved with `HEAD` wait this long for their manifest to be fetched by digest.
pub const PENDING_TAG_TTL: std::time::Duration = std::time::Duration::from_secs(600);
/// Most tags (accept variants) remembered for one pending digest.
pub(super) const MAX_PENDING_TAGS: usize = 16;

pub(super) async fn manifest_by_tag(
    api: &Arc<RegistryApi>,
    target: &Arc<Target>,
    req: Request<Body>,
    repo: &RepoName,
    tag: &Tag,
) -> Served {
    let method = req.method().clone();
    let pq = path_and_query(&req).to_owned();
    let key = TagKey::new(target.repo(repo), tag.clone());
    let accept = accept_key(req.headers());
    let row = api.cache.store.tag(&key).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "tag lookup failed; treating as a miss");
        None
    });
    let cached = row
        .as_ref()
        .and_then(|r| negotiate(r, &accept))
        .and_then(|v| stored_manifest(api, &v.digest).map(|m| (v.clone(), m)));
    if let Some((variant, stored)) = cached {
        let len = stored.bytes.len() as u64;
        let file = Stored::Memory(stored.bytes.clone());
        let digest = variant.digest.clone();
        let ttl = api.rules.tag_ttl.ttl(&target.registry, tag.as_str());
        // `Cache-Control: no-cache` (`stowage cache refresh`, or a client that asks):
        // revalidate now, whatever the TTL and the quota guard say.
        let no_cache = req
            .headers()
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| d.trim().eq_ignore_ascii_case("no-cache"));
        let fresh = !no_cache && variant.is_fresh(now_ms(), ttl);
        // The quota guard: this account's pulls left are below the reserve (see `quota`).
        let guarded = !fresh
            && !no_cache
            && api
                .quota
                .engaged(&target.registry, credential_id(req.headers()));
        if fresh || guarded {
            let authorized = match authorize(
                api,
                target,
                repo,
                &digest,
                Object::Manifest,
                req.headers(),
                UpstreamNow::Ask,
                Some(len),
            )
            .await
            {
                Ok(a) => a,
                Err(refused) => return (CacheStatus::Hit, Ok(refused)),
            };
            let served = serve_stored(authorized, file, len, &variant.media_type, &method, None);
            if !guarded {
                return (CacheStatus::Hit, served);
            }
            return (
                CacheStatus::Stale,
                served.map(|mut r| {
                    r.headers_mut()
                        .insert(WARNING, crate::http_util::stale_warning());
                    r
                }),
            );
        }
        // Stale: revalidate with HEAD, which Docker Hub does not count against pull limits.
        let head = revalidate(api, target, &key, &accept, &pq, req.headers()).await;
        match head {
            Ok(r) if r.status() == StatusCode::OK => {
                let upstream_digest = r
                    .headers()
                    .get(DOCKER_CONTENT_DIGEST)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<Digest>().ok());
                if upstream_digest.as_ref() == Some(&digest) {
                    // Upstream just confirmed, for this client, that the tag names this
                    // manifest in this repository.
                    let authorized = api
                        .access
                        .granted_by_upstream(
                            &key.repo,
                            &digest,
                            credential_id(req.headers()),
                            r.status(),
                        )
                        .expect("a 200 authorizes");
                    let updated = TagVariant {
                        checked_at_ms: now_ms(),
                        ..variant.clone()
                    };
                    set_tag(api, key.clone(), updated).await;
                    return (
                        CacheStatus::Hit,
                        serve_stored(authorized, file, len, &variant.media_type, &method, None),
                    );
                }
                // The tag moved (or upstream did not say where): fetch it below.
            }
            Ok(r) if matches!(r.status().as_u16(), 401 | 403 | 404) => {
                return (CacheStatus::Miss, Ok(revalidation_answer(&method, r)))
            }
            other => {
                let why = match &other {
                    Ok(r) => format!("upstream answered {}", r.status()),
                    Err(e) => e.to_string(),
                };
                // The same decision as every hit, told that upstream is failing right now.
                let decided = authorize(
                    api,
                    target,
                    repo,
                    &digest,
                    Object::Manifest,
                    req.headers(),
                    UpstreamNow::Failing,
                    Some(len),
                )
                .await;
                let authorized = match (decided, other) {
                    (Ok(authorized), _) => authorized,
                    // Upstream's own answer (a 429's Retry-After, say) is the better one.
                    (Err(_), Ok(r)) => {
                        return (CacheStatus::Miss, Ok(revalidation_answer(&method, r)))
                    }
                    // Unreachable: why the cached manifest is not served (as for a blob).
                    (Err(refused), Err(_)) => return (CacheStatus::Miss, Ok(refused)),
                };
                tracing::warn!(tag = %key, %why, "serving a stale manifest");
                let mut resp =
                    match serve_stored(authorized, file, len, &variant.media_type, &method, None) {
                        Ok(r) => r,
                        Err(e) => return (CacheStatus::Stale, Err(e)),
                    };
                resp.headers_mut()
                    .insert(WARNING, crate::http_util::stale_warning());
                return (CacheStatus::Stale, Ok(resp));
            }
        }
    }
    if method == Method::HEAD {
        let served = fetch_uncached(api, target, req).await;
        if let (_, Ok(resp)) = &served {
            if resp.status() == StatusCode::OK {
                remember_tag_head(api, &key, accept, resp.headers()).await;
            }
        }
        return served;
    }
    match fetch_manifest(api, target, &pq, req.headers(), None).await {
        Ok(Fetch::Stored(resp, digest)) => {
            api.upstream_served(target, &key.repo, None, credential_id(req.headers()), pq);
            let media_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            if !media_type.is_empty() {
                let variant = TagVariant {
                    accept,
                    digest,
                    media_type,
                    checked_at_ms: now_ms(),
                };
                set_tag(api, key, variant).await;
            }
            (CacheStatus::Miss, Ok(resp))
        }
        Ok(Fetch::Relayed(resp)) => (CacheStatus::Miss, Ok(resp)),
        Err(e) => (CacheStatus::Miss, Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_keys_are_sorted_lowercase_types_without_parameters() {
        let mut h = HeaderMap::new();
        assert_eq!(accept_key(&h), "");
        h.append(
            ACCEPT,
            HeaderValue::from_static(
                "application/vnd.OCI.image.manifest.v1+json; q=0.9, application/json",
            ),
        );
        h.append(
            ACCEPT,
            HeaderValue::from_static(" application/vnd.oci.image.manifest.v1+json ,,*/*;q=0.1"),
        );
        assert_eq!(
            accept_key(&h),
            "*/*,application/json,application/vnd.oci.image.manifest.v1+json"
        );
    }
}
