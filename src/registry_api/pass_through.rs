//! Everything that is not a blob or manifest by digest or tag (`/v2/`, tags lists,
//! referrers, uploads, token endpoints on auth hosts): forwarded unchanged, with the
//! configured account answering challenges for clients that bring none.

use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WARNING};
use http::{HeaderValue, Method, Request, Response, StatusCode};

use super::{path_and_query, relay, upstream_fetch, upstream_headers, RegistryApi, Served, Target};
use crate::http_util::{full, Body};
use crate::telemetry::CacheStatus;

pub(super) async fn pass(api: &RegistryApi, target: &Target, req: Request<Body>) -> Served {
    let ping = !target.auth_host
        && matches!(req.uri().path(), "/v2/" | "/v2")
        && matches!(*req.method(), Method::GET | Method::HEAD);
    if !ping {
        return forward(api, target, req).await;
    }
    let (status, answer) = forward(api, target, req).await;
    let failing = match &answer {
        Ok(r) => r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS,
        Err(_) => true,
    };
    if !failing {
        return (status, answer);
    }
    let why = match &answer {
        Ok(r) => format!("upstream answered {}", r.status()),
        Err(e) => e.to_string(),
    };
    tracing::warn!(registry = %target.registry, %why, "answering the version check (/v2/) from the cache");
    (CacheStatus::Stale, Ok(ping_answer()))
}

/// The version check as Stowage answers it when upstream cannot.
fn ping_answer() -> Response<Body> {
    let mut r = Response::new(full("{}"));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    h.insert(
        WARNING,
        HeaderValue::from_static("110 stowage \"Response is Stale\""),
    );
    r
}

async fn forward(api: &RegistryApi, target: &Target, req: Request<Body>) -> Served {
    let pq = path_and_query(&req).to_owned();
    let bodiless = matches!(*req.method(), Method::GET | Method::HEAD)
        && !req.headers().contains_key(CONTENT_LENGTH);
    let answers = target.mirror || api.accounts.credentials.contains_key(&target.registry);
    if bodiless && !target.auth_host && answers && !req.headers().contains_key(AUTHORIZATION) {
        // Answer the challenge with the configured account (the `/v2/` ping included), so
        // anonymous clients pull as that account.
        let r = upstream_fetch(api, target, req.method().clone(), &pq, req.headers(), false).await;
        return (CacheStatus::Pass, r.map(relay));
    }
    let uri = match target.uri(&pq) {
        Ok(u) => u,
        Err(e) => return (CacheStatus::Pass, Err(e)),
    };
    let (parts, body) = req.into_parts();
    let mut up = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(body)
        .expect("valid parts");
    *up.headers_mut() = upstream_headers(&parts.headers);
    if target.auth_host && !up.headers().contains_key(AUTHORIZATION) {
        let account = api.accounts.inject.get(&target.registry);
        if let Some(value) = account.and_then(|a| a.authorization_for(up.uri())) {
            up.headers_mut().insert(AUTHORIZATION, value);
        }
    }
    match api.upstream.send(up).await {
        Ok(resp) => (CacheStatus::Pass, Ok(relay(resp))),
        Err(e) => (CacheStatus::Pass, Err(e.into())),
    }
}
