//! The proxy's own endpoints, written once for every listener that serves them:
//! `/ca.crt` (the CA certificate, never its key), `/healthz`, `/metrics` (Prometheus text),
//! `/setup/<runtime>` (configuration snippets) and `/admin/*` (the running server's side of
//! `stowage cache ...`, for local clients only).

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::loop_guard::canonical_ip;
use super::{Ingress, Listener};
use crate::http_util::{full, text, Body};

/// The endpoint for an origin-form request to `listener`, or `None` when the path is not
/// one of ours. `/admin/*` answers only clients on this machine that spoke to the listener
/// directly (never a request that came through the proxy's forwarding path).
pub async fn serve(
    ingress: &Arc<Ingress>,
    listener: Listener,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Option<Response<Body>> {
    let path = req.uri().path();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    Some(match (path, listener) {
        ("/ca.crt", _) if get => {
            let mut r = Response::new(full(ingress.ca.cert_pem().to_owned()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-pem-file"),
            );
            r
        }
        ("/healthz", _) if get => text(StatusCode::OK, "ok"),
        ("/ca.crt" | "/healthz", _) => text(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        ("/metrics", Listener::Proxy) if get => {
            let mut r = Response::new(full(render_metrics(ingress)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (p, Listener::Proxy) if get && p.starts_with("/setup/") => {
            let runtime = &p["/setup/".len()..];
            let address = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
                .unwrap_or_else(|| ingress.own.listeners[0].to_string());
            match crate::admin::setup::snippet(
                runtime,
                &address,
                &ingress.config,
                ingress.ca.cert_pem(),
            ) {
                Ok(s) => text(StatusCode::OK, s.trim_end()),
                Err(e) => text(StatusCode::NOT_FOUND, &e),
            }
        }
        (p, Listener::Proxy) if p.starts_with("/admin/") => {
            if !canonical_ip(peer.ip()).is_loopback() {
                return Some(text(
                    StatusCode::FORBIDDEN,
                    "admin endpoints answer loopback clients only",
                ));
            }
            admin(ingress, req).await
        }
        _ => return None,
    })
}

/// The metrics text, with live gauges read now.
fn render_metrics(ingress: &Ingress) -> String {
    let cache = &ingress.api.cache;
    let m = &ingress.api.metrics;
    m.fills_in_flight.set(cache.fills.in_flight() as i64);
    m.cache_size.set(cache.store.index.total() as i64);
    m.cache_objects.set(cache.store.index.len() as i64);
    let minted = ingress.ca.minted();
    let counted = m.certificates_minted.get();
    if minted > counted {
        m.certificates_minted.inc_by(minted - counted);
    }
    m.render()
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_string_pretty(v).unwrap_or_default()));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `/admin/*`: the running server's side of `stowage cache ...`.
async fn admin(ingress: &Arc<Ingress>, req: &Request<Incoming>) -> Response<Body> {
    use crate::admin;
    let query: std::collections::HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let st = ingress.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<Response<Body>, String> {
        let store = &st.api.cache.store;
        Ok(match (method, path.as_str()) {
            (Method::GET, "/admin/info") => json(&admin::ServerInfo::new(&st.config.cache.dir)),
            (Method::GET, "/admin/stats") => {
                let mut s = admin::stats(store, st.api.cache.limits.max_size);
                s.since_start = Some(st.api.metrics.traffic());
                json(&s)
            }
            (Method::GET, "/admin/ls") => json(&admin::list(store).map_err(|e| e.to_string())?),
            (Method::POST, "/admin/verify") => {
                let report = admin::verify(store, |_, d, ok| {
                    if !ok {
                        tracing::warn!(digest = %d, "verify: corrupt object removed");
                    }
                })
                .map_err(|e| e.to_string())?;
                json(&report)
            }
            (Method::POST, "/admin/prune") => {
                let max = query
                    .get("max_size")
                    // Bytes, or a size with its unit (what `stowage cache prune` sends).
                    .map(|v| {
                        v.parse::<u64>()
                            .map(crate::settings::Size)
                            .or_else(|_| v.parse::<crate::settings::Size>())
                    })
                    .transpose()?
                    .map(|s| s.0);
                let older = query
                    .get("older_than")
                    .map(|v| v.parse::<crate::settings::HumanDuration>())
                    .transpose()?
                    .map(|d| d.0);
                json(&admin::prune(store, max, older).map_err(|e| e.to_string())?)
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "admin: GET info, GET stats, GET ls, POST verify, POST prune?max_size=&older_than=",
            ),
        })
    })
    .await;
    match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => text(StatusCode::BAD_REQUEST, &e),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
