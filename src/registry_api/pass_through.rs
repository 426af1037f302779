//! Everything that is not a blob or manifest by digest or tag (`/v2/`, tags lists,
//! referrers, uploads, token endpoints on auth hosts): forwarded unchanged, with the
//! configured account answering challenges for clients that bring none.
//!
//! Two answers come from Stowage itself when upstream cannot give them (unreachable, `5xx`,
//! `429`, `[cache] offline = true`), so that clients go on to ask for what is cached:
//!
//! - the version check (`/v2/`): `200`, marked stale;
//! - an anonymous token request whose every scope is `repository:NAME:pull` of a
//!   repository known to be public on a registry that sends clients to this token
//!   endpoint: a placeholder token ([`PLACEHOLDER_TOKEN`]), never a token issued to
//!   someone else. A request that carries it is anonymous: `serve` removes it before
//!   anything else sees the request and Stowage answers upstream challenges itself, so the
//!   placeholder never leaves and opens nothing a client without credentials could not read.

use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WARNING};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

use super::{
    path_and_query, relay, upstream_fetch, upstream_headers_for, RegistryApi, Served, Target,
};
use crate::http_util::{full, percent_decode, stale_warning, Body};
use crate::oci::{RepoKey, RepoName};
use crate::telemetry::CacheStatus;

/// The token Stowage hands out for public repositories while their token endpoint cannot
/// answer. It stands for "no credentials": see the module header.
pub const PLACEHOLDER_TOKEN: &str = "stowage-anonymous";

/// Whether `headers` carry [`PLACEHOLDER_TOKEN`] as their `Authorization`.
pub fn holds_placeholder(headers: &HeaderMap) -> bool {
    headers.get(AUTHORIZATION).is_some_and(|v| {
        v.to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .is_some_and(|(scheme, token)| {
                scheme.eq_ignore_ascii_case("bearer") && token.trim() == PLACEHOLDER_TOKEN
            })
    })
}

pub(super) async fn pass(api: &RegistryApi, target: &Target, req: Request<Body>) -> Served {
    let ping = !target.auth_host
        && matches!(req.uri().path(), "/v2/" | "/v2")
        && matches!(*req.method(), Method::GET | Method::HEAD);
    let pull_scopes = anonymous_pull_scopes(&req);
    if !ping && pull_scopes.is_none() {
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
    if ping {
        tracing::warn!(registry = %target.registry, %why, "answering the version check (/v2/) from the cache");
        return (CacheStatus::Stale, Ok(ping_answer()));
    }
    let scopes = pull_scopes.unwrap_or_default();
    let registries = if target.auth_host {
        api.accounts
            .auth_hosts
            .get(&target.registry)
            .cloned()
            .unwrap_or_default()
    } else {
        vec![target.registry.clone()]
    };
    let public = |name: &RepoName| {
        registries.iter().any(|r| {
            api.access
                .known_public(&RepoKey::new(r.clone(), name.clone()))
        })
    };
    if !scopes.iter().all(public) {
        tracing::info!(host = %target.registry, %why, "token endpoint unavailable; not every repository asked for is known to be public");
        return (status, answer);
    }
    let repos: Vec<&str> = scopes.iter().map(RepoName::as_str).collect();
    tracing::warn!(host = %target.registry, %why, repos = %repos.join(","), "token endpoint unavailable; answering with an anonymous placeholder for public repositories");
    (CacheStatus::Stale, Ok(placeholder_answer()))
}

/// The repositories of a token request that asks for nothing but `pull` scopes and brings
/// no credentials (`GET ...?scope=repository:NAME:pull[&scope=...]`); `None` otherwise.
fn anonymous_pull_scopes(req: &Request<Body>) -> Option<Vec<RepoName>> {
    if req.method() != Method::GET || req.headers().contains_key(AUTHORIZATION) {
        return None;
    }
    let mut names = Vec::new();
    for pair in req.uri().query()?.split('&') {
        let Some(value) = pair.strip_prefix("scope=") else {
            continue;
        };
        let value = percent_decode(value)?;
        for scope in value.split(' ').filter(|s| !s.is_empty()) {
            let mut parts = scope.splitn(3, ':');
            let (Some("repository"), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return None;
            };
            if actions.split(',').any(|a| a != "pull") {
                return None;
            }
            names.push(name.parse::<RepoName>().ok()?);
        }
    }
    (!names.is_empty()).then_some(names)
}

/// A token response (Docker's token spec) carrying [`PLACEHOLDER_TOKEN`].
fn placeholder_answer() -> Response<Body> {
    let body = format!(
        r#"{{"token":"{PLACEHOLDER_TOKEN}","access_token":"{PLACEHOLDER_TOKEN}","expires_in":300}}"#
    );
    let mut r = Response::new(full(body));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(WARNING, stale_warning());
    r
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
    h.insert(WARNING, stale_warning());
    r
}

async fn forward(api: &RegistryApi, target: &Target, req: Request<Body>) -> Served {
    let pq = path_and_query(&req).to_owned();
    let bodiless = matches!(*req.method(), Method::GET | Method::HEAD)
        && !req.headers().contains_key(CONTENT_LENGTH);
    let answers =
        target.answers_challenges || api.accounts.credentials.contains_key(&target.registry);
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
    *up.headers_mut() = upstream_headers_for(target, &parts.headers);
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
