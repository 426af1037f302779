//! Blobs by digest: a disk hit, a coalesced fill (one upstream download, any number of
//! readers following the growing file), the shared tier, or a verified pass-through when
//! the cache cannot take it. No reader sees a blob's last byte before its digest verifies.

use std::sync::Arc;

use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use tracing::Instrument;

use super::{
    authorize, blob_headers, fetch_uncached, path_and_query, relay, serve_stored, upstream_fetch,
    Object, RegistryApi, Served, Target,
};
use crate::access::{Authorized, UpstreamNow};
use crate::cache::fill::{fill_stream, Fill, FillError, FillState, Join, Leader, Verified};
use crate::http_util::{set_len, Body};
use crate::oci::{Digest, RepoName};
use crate::telemetry::CacheStatus;
use crate::upstream::credential_id;

pub(super) const OCTET_STREAM: &str = "application/octet-stream";

pub(super) async fn blob(
    api: &Arc<RegistryApi>,
    target: &Arc<Target>,
    req: Request<Body>,
    repo: &RepoName,
    digest: &Digest,
) -> Served {
    let method = req.method().clone();
    let pq = path_and_query(&req).to_owned();
    match api.cache.store.open_blob(digest) {
        Ok(Some((file, len))) => {
            let authorized = match authorize(
                api,
                target,
                repo,
                digest,
                Object::Blob,
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
                    file,
                    len,
                    OCTET_STREAM,
                    &method,
                    req.headers().get(RANGE),
                ),
            );
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(%digest, error = %e, "cannot read cached blob; passing through");
            return fetch_uncached_blob(api, target, req, digest).await;
        }
    }
    // A HEAD or a ranged GET on a miss is answered upstream and does not start a fill.
    if method == Method::HEAD || req.headers().contains_key(RANGE) {
        return fetch_uncached_blob(api, target, req, digest).await;
    }
    if api.cache.fills.in_flight() >= api.cache.limits.max_concurrent_fills
        && !api.cache.fills.is_filling(digest)
    {
        tracing::debug!(%digest, "fill limit reached; passing through");
        return fetch_uncached_blob(api, target, req, digest).await;
    }
    if let Err(why) = api.cache.may_cache() {
        api.metrics.write_error(why);
        tracing::debug!(%digest, why, "not caching; passing through");
        return fetch_uncached_blob(api, target, req, digest).await;
    }
    let join = match api.cache.fills.join(&api.cache.store, digest) {
        Ok(j) => j,
        Err(e) => {
            api.metrics.write_error("create");
            tracing::warn!(%digest, error = %e, "cannot start a fill; passing through");
            return fetch_uncached_blob(api, target, req, digest).await;
        }
    };
    match join {
        Join::Stored => match api.cache.store.open_blob(digest) {
            Ok(Some((file, len))) => {
                let authorized = match authorize(
                    api,
                    target,
                    repo,
                    digest,
                    Object::Blob,
                    req.headers(),
                    UpstreamNow::Ask,
                    Some(len),
                )
                .await
                {
                    Ok(a) => a,
                    Err(refused) => return (CacheStatus::Hit, Ok(refused)),
                };
                (
                    CacheStatus::Hit,
                    serve_stored(authorized, file, len, OCTET_STREAM, &method, None),
                )
            }
            _ => fetch_uncached_blob(api, target, req, digest).await,
        },
        Join::Follower(fill) => {
            // Joining someone else's download is a hit on bytes this client has not been
            // authorized for yet.
            let authorized = match authorize(
                api,
                target,
                repo,
                digest,
                Object::Blob,
                req.headers(),
                UpstreamNow::Ask,
                None,
            )
            .await
            {
                Ok(a) => a,
                Err(refused) => return (CacheStatus::Coalesced, Ok(refused)),
            };
            api.metrics.coalesced_readers.inc();
            let mut rx = fill.subscribe();
            let state_now = rx
                .wait_for(|s| !matches!(s, FillState::Waiting))
                .await
                .map(|s| s.clone());
            match state_now {
                Ok(FillState::Streaming { total, .. }) => (
                    CacheStatus::Coalesced,
                    Ok(fill_response(authorized, fill, total)),
                ),
                // All of it is there and verified, only fsyncs pending: a hit in all but name.
                Ok(FillState::Verified { len } | FillState::Complete { len }) => (
                    CacheStatus::Hit,
                    Ok(fill_response(authorized, fill, Some(len))),
                ),
                // The leader's upstream answer was not content (401, 404, error): this client
                // asks upstream itself, with its own credentials.
                _ => fetch_uncached_blob(api, target, req, digest).await,
            }
        }
        Join::Leader(leader) => {
            leader.set_origin(
                api.metrics.registry_label(&target.registry),
                repo.to_string(),
            );
            // The shared tier first: content another replica fetched and verified. It is
            // cached content, so the client must be authorized for it like a hit.
            if let Some(backend) = api.cache.shared.clone() {
                let authorized = match authorize(
                    api,
                    target,
                    repo,
                    digest,
                    Object::Blob,
                    req.headers(),
                    UpstreamNow::Ask,
                    None,
                )
                .await
                {
                    Ok(a) => a,
                    Err(refused) => {
                        leader.abandon("client not authorized");
                        return (CacheStatus::Hit, Ok(refused));
                    }
                };
                match backend.get(digest).await {
                    Ok(Some((body, len))) => {
                        // The response (its reader) first, so the fill never runs ahead of it.
                        let resp = fill_response(authorized, leader.fill(), Some(len));
                        spawn_fill(api, target, repo, leader, body, Some(len), None);
                        return (CacheStatus::Hit, Ok(resp));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(%digest, error = %e, "shared store unavailable; asking upstream")
                    }
                }
            }
            let mut headers = req.headers().clone();
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
            let resp = match upstream_fetch(api, target, Method::GET, &pq, &headers, true).await {
                Ok(r) => r,
                Err(e) => {
                    leader.abandon(&e.to_string());
                    return (CacheStatus::Miss, Err(e));
                }
            };
            if resp.status() != StatusCode::OK {
                leader.abandon(&format!("upstream answered {}", resp.status()));
                return (CacheStatus::Miss, Ok(relay(resp)));
            }
            let total = resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if total.is_some_and(|t| t > api.cache.limits.max_size) {
                leader.abandon("larger than the whole cache");
                return (CacheStatus::Miss, Ok(verified_relay(api, resp, digest)));
            }
            // A blob that would fill the disk is passed through whole rather than failing
            // half-way through the write.
            if let (Some(t), Some(free)) = (total, api.cache.store.free_space()) {
                if free < t.saturating_add(api.cache.limits.min_free) {
                    api.metrics.write_error("disk_full");
                    tracing::info!(%digest, bytes = t, free, "not enough free space to cache this blob; passing through");
                    leader.abandon("not enough free space");
                    return (CacheStatus::Miss, Ok(verified_relay(api, resp, digest)));
                }
            }
            // Upstream's 200 to this client's own request is what the client may read: the
            // fill verifies it before the last byte, and only then is it a grant.
            let authorized = api.access.upstream_answer(digest);
            let grant = Grant {
                target: target.clone(),
                repo: target.repo(repo),
                credential: credential_id(req.headers()),
                path: pq.clone(),
            };
            let client = fill_response(authorized, leader.fill(), total);
            spawn_fill(
                api,
                target,
                repo,
                leader,
                resp.into_body(),
                total,
                Some(grant),
            );
            (CacheStatus::Miss, Ok(client))
        }
    }
}

/// Runs a fill to completion in the background (even if this client goes away), then,
/// for content new to the shared tier, uploads it there.
/// Who upstream served a fill to: granted once the fill verifies.
pub(super) struct Grant {
    target: Arc<Target>,
    repo: crate::oci::RepoKey,
    credential: [u8; 32],
    path: String,
}

/// Runs a fill to completion in the background. `grant` is the client whose own upstream
/// request the fill is (new content, uploaded to the shared tier); `None` for content
/// from the shared tier.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_fill(
    api: &Arc<RegistryApi>,
    target: &Target,
    repo: &RepoName,
    leader: Leader,
    body: Body,
    total: Option<u64>,
    grant: Option<Grant>,
) {
    let upload = grant.is_some();
    let digest = leader.digest().clone();
    // Every line of the fill (a disk that gives out included) names what it was for.
    let span = tracing::info_span!("fill", registry = %target.registry, %repo, %digest);
    let st = api.clone();
    let (registry, repo_name) = (target.registry.clone(), repo.to_string());
    api.spawn_background(
        async move {
            let idle = st.upstream.idle_timeout();
            // Once per fill, at the moment the disk gives out: the readers go on from upstream.
            let on_store_error = |e: &crate::cache::StoreError| {
                cache_write_failed(&st, e, "this blob streams on from upstream, uncached");
            };
            let mut leader = leader;
            if let Some(g) = grant {
                // Granted once the bytes verify and before the blob is visible: a reader
                // that finds it stored finds the grant too.
                let (api, d) = (st.clone(), digest.clone());
                leader.on_verified(move || {
                    api.upstream_served(&g.target, &g.repo, Some(&d), g.credential, g.path);
                });
            }
            match leader.run(body, total, idle, on_store_error).await {
                Ok(len) => {
                    tracing::debug!(bytes = len, "stored");
                    if let (true, Some(backend)) = (upload, st.cache.shared.clone()) {
                        let path = st.cache.store.path(&digest);
                        match backend.put(&digest, &path, len).await {
                            Ok(()) => tracing::debug!("uploaded to the shared store"),
                            Err(e) => {
                                st.metrics.write_error("shared_store");
                                tracing::warn!(error = %e, "upload to the shared store failed")
                            }
                        }
                    }
                }
                Err(e) if e.is_mismatch() => {
                    st.metrics.digest_mismatch(
                        &registry,
                        &repo_name,
                        &format!("blob {digest}: {e}"),
                    );
                    tracing::error!(error = %e, "digest mismatch: content discarded")
                }
                Err(e @ (FillError::Relayed { .. } | FillError::NoReaders(_))) => {
                    tracing::debug!(error = %e, "not stored")
                }
                Err(FillError::Store(e)) => {
                    cache_write_failed(
                        &st,
                        &e,
                        "the verified blob reached its readers, not the cache",
                    );
                }
                Err(e) => tracing::warn!(error = %e, "fill failed"),
            }
        }
        .instrument(span),
    );
}

/// A cache write failed: counted, and caching paused (until space is back for a full disk,
/// for a while otherwise), with a line that says which and what became of the content.
fn cache_write_failed(api: &RegistryApi, e: &crate::cache::StoreError, outcome: &str) {
    if e.is_disk_full() {
        api.metrics.write_error("disk_full");
        api.cache.pause_until_space();
        tracing::warn!(error = %e, "cache disk full: caching paused until space is freed; {outcome}");
    } else {
        api.metrics.write_error("write");
        api.cache.pause_caching();
        tracing::warn!(error = %e, "cache write failed: caching paused for a while; {outcome}");
    }
}

pub(super) fn fill_response(
    authorized: Authorized,
    fill: Arc<Fill>,
    total: Option<u64>,
) -> Response<Body> {
    let mut resp = Response::new(StreamBody::new(fill_stream(fill, 0)).boxed_unsync());
    let h = resp.headers_mut();
    blob_headers(h, authorized.digest());
    h.insert(CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM));
    if let Some(t) = total {
        set_len(h, t);
    }
    resp
}

/// A blob request answered upstream without filling the cache. A whole `200` body is
/// hashed as it passes and its last frame held back until it matches `digest`, so wrong
/// content never reaches the client complete (a range cannot be checked and is relayed).
pub(super) async fn fetch_uncached_blob(
    api: &RegistryApi,
    target: &Target,
    req: Request<Body>,
    digest: &Digest,
) -> Served {
    let get = req.method() == Method::GET;
    if req.method() == Method::HEAD {
        return head_uncached_blob(api, target, req, digest).await;
    }
    let (outcome, r) = fetch_uncached(api, target, req).await;
    let r = r.map(|resp| {
        if get && resp.status() == StatusCode::OK {
            verify_body(api, resp, digest)
        } else {
            resp
        }
    });
    (outcome, r)
}

/// A `HEAD` of a blob Stowage does not have. Upstream's answer is relayed, except a
/// redirect to storage: the client would have to reach the storage host itself (which
/// `tunnel_ports` usually refuses, and storage URLs are often signed for `GET` only), so
/// Stowage asks storage for one byte (`Range: bytes=0-0`, redirects followed) and answers
/// `200` with the blob's length and digest, no `Location`.
async fn head_uncached_blob(
    api: &RegistryApi,
    target: &Target,
    req: Request<Body>,
    digest: &Digest,
) -> Served {
    let pq = path_and_query(&req).to_owned();
    let head = upstream_fetch(api, target, Method::HEAD, &pq, req.headers(), false).await;
    let head = match head {
        Ok(r) if r.status().is_redirection() && r.headers().contains_key(LOCATION) => r,
        other => return (CacheStatus::Miss, other.map(relay)),
    };
    drop(head);
    let mut headers = req.headers().clone();
    headers.insert(RANGE, HeaderValue::from_static("bytes=0-0"));
    let probe = match upstream_fetch(api, target, Method::GET, &pq, &headers, true).await {
        Ok(r) => r,
        Err(e) => return (CacheStatus::Miss, Err(e)),
    };
    let status = probe.status();
    if !matches!(status, StatusCode::PARTIAL_CONTENT | StatusCode::OK) {
        return (CacheStatus::Miss, Ok(relay(probe)));
    }
    let len = crate::http_util::size_from_ranged_answer(&probe);
    let Some(len) = len else {
        tracing::warn!(%digest, %status, "storage gave no blob length for a HEAD");
        return (CacheStatus::Miss, Ok(relay(probe)));
    };
    drop(probe);
    let mut resp = Response::new(crate::http_util::empty());
    blob_headers(resp.headers_mut(), digest);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM));
    set_len(resp.headers_mut(), len);
    (CacheStatus::Miss, Ok(resp))
}

/// `relay`, with the body verified against `digest` (see `fetch_uncached_blob`).
pub(super) fn verified_relay(
    api: &RegistryApi,
    resp: Response<Body>,
    digest: &Digest,
) -> Response<Body> {
    verify_body(api, relay(resp), digest)
}

pub(super) fn verify_body(
    api: &RegistryApi,
    resp: Response<Body>,
    digest: &Digest,
) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let verified = Verified::new(body, digest.clone(), Some(api.metrics.clone()));
    Response::from_parts(parts, verified.boxed_unsync())
}
