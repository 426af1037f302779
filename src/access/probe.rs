//! The questions the access decision asks upstream: "may this client read this object
//! here?" (a `HEAD` of the object with the client's credentials) and, in the background,
//! "does upstream serve this repository to anyone?" (the same without credentials).

use http::header::{ACCEPT, RANGE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::policy::Reply;
use crate::oci::Registry;
use crate::upstream::token_auth::{self, Answer};
use crate::upstream::Upstream;

/// The manifest media types Stowage's own requests accept.
pub const PROBE_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, */*";

async fn fetch(
    upstream: &Upstream,
    registry: &Registry,
    answer: Answer<'_>,
    method: Method,
    path: &str,
    headers: HeaderMap,
    follow: bool,
) -> Result<Response<crate::http_util::Body>, String> {
    let uri = registry.uri(path).map_err(|e| e.to_string())?;
    token_auth::fetch(upstream, method, uri, headers, answer, follow)
        .await
        .map(|f| f.response)
        .map_err(|e| e.to_string())
}

/// "May this client read this object here?", asked upstream with the client's
/// credentials (`headers`, ready to go upstream): a `HEAD` of the object. A redirect (blob
/// storage) is followed with a one-byte ranged `GET`, since storage URLs are often signed
/// for `GET` only; it counts as a yes only when storage answers with content of the stored
/// object's size (`len`), so a login page at the end of a redirect is no yes.
pub async fn ask(
    upstream: &Upstream,
    registry: &Registry,
    answer: Answer<'_>,
    object_path: &str,
    headers: HeaderMap,
    len: Option<u64>,
) -> Result<Reply, String> {
    let resp = fetch(
        upstream,
        registry,
        answer,
        Method::HEAD,
        object_path,
        headers.clone(),
        false,
    )
    .await?;
    if !resp.status().is_redirection() {
        return Ok(reply_of(&resp));
    }
    let mut ranged = headers;
    ranged.insert(RANGE, HeaderValue::from_static("bytes=0-0"));
    let resp = fetch(
        upstream,
        registry,
        answer,
        Method::GET,
        object_path,
        ranged,
        true,
    )
    .await?;
    if !matches!(resp.status(), StatusCode::PARTIAL_CONTENT | StatusCode::OK) {
        return Ok(reply_of(&resp));
    }
    let size = crate::http_util::size_from_ranged_answer(&resp);
    let matches = match (len, size) {
        (Some(want), Some(got)) => want == got,
        (None, _) => true,
        (Some(_), None) => false,
    };
    Ok(Reply {
        status: if matches {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        },
        headers: HeaderMap::new(),
    })
}

/// Upstream's answer to `path` without any credentials, for the public-repository probe.
/// Redirects are not followed: a redirect is not a yes (it may be a login page).
pub async fn anonymous(upstream: &Upstream, registry: &Registry, path: &str) -> Option<StatusCode> {
    // A manifest HEAD without `Accept` is refused by registries that hold only OCI
    // manifests ("accept header does not support OCI manifests"): offer every type.
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, HeaderValue::from_static(PROBE_ACCEPT));
    fetch(
        upstream,
        registry,
        Answer::With(None),
        Method::HEAD,
        path,
        headers,
        false,
    )
    .await
    .ok()
    .map(|r| r.status())
}

/// The parts of an upstream answer a refusal passes on.
fn reply_of<B>(resp: &Response<B>) -> Reply {
    let mut headers = HeaderMap::new();
    for name in [WWW_AUTHENTICATE, http::header::RETRY_AFTER] {
        for v in resp.headers().get_all(&name) {
            headers.append(name.clone(), v.clone());
        }
    }
    Reply {
        status: resp.status(),
        headers,
    }
}
