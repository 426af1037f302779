//! The proxy's own endpoints, written once for every listener that serves them:
//! `/ca.crt` (the CA certificate, never its key), `/healthz`, `/metrics` (Prometheus text),
//! `/setup/<runtime>` (configuration snippets), `/`, `/status` and `/status.json` (the status
//! page, `admin::status`) and `/admin/*` (the running server's side of
//! `stowage cache ...`, for local clients only).

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::loop_guard::canonical_ip;
use super::{Ingress, Listener};
use crate::http_util::{full, text, Body};

/// Whether this request may read what the proxy knows (`/metrics`, the status page: which
/// repositories are pulled, what failed): anyone the allow list lets in, unless the proxy
/// has users; then only they, by `Authorization: Basic` (browsers, Prometheus'
/// `basic_auth`) or `Proxy-Authorization`. `/healthz` and `/ca.crt` stay open.
async fn reader_allowed(ingress: &Ingress, req: &Request<Incoming>) -> bool {
    let Some(users) = &ingress.proxy.users else {
        return true;
    };
    for header in [
        http::header::AUTHORIZATION,
        http::header::PROXY_AUTHORIZATION,
    ] {
        if let Some(v) = req.headers().get(&header) {
            if users.check(Some(v)).await {
                return true;
            }
        }
    }
    false
}

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
        ("/metrics" | "/" | "/status" | "/status.json", Listener::Proxy)
            if get && !reader_allowed(ingress, req).await =>
        {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "this Stowage has proxy users: send one's credentials (Authorization: Basic)",
            );
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"stowage\""),
            );
            r
        }
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
        ("/" | "/status" | "/status.json", Listener::Proxy) if get => status(ingress, path).await,
        ("/" | "/status" | "/status.json", Listener::Proxy) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        (p, Listener::Proxy) if get && p.starts_with("/setup/") => {
            let runtime = &p["/setup/".len()..];
            let (proxy, mirror) = bound(ingress);
            let reach = match req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
            {
                Some(host) => crate::admin::setup::Reach::given(
                    host,
                    proxy,
                    mirror,
                    "the address this request was sent to (its Host)",
                ),
                None => {
                    crate::admin::setup::Reach::of_listeners(proxy, mirror, hostname().as_deref())
                }
            };
            match crate::admin::setup::snippet(
                runtime,
                &reach,
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

/// The bound proxy and mirror listener addresses (bound in the order proxy, mirror, direct).
fn bound(ingress: &Ingress) -> (SocketAddr, Option<SocketAddr>) {
    let l = &ingress.own.listeners;
    let mirror = match ingress.config.mirror_listen() {
        Ok(Some(_)) => l.get(1).copied(),
        _ => None,
    };
    (l[0], mirror)
}

/// This machine's name, for snippets when the proxy listens on every address.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// `GET /admin/setup?runtime=R[&address=A]`: `stowage setup`'s snippet, rendered by the
/// server with its own CA, configuration and bound listeners.
fn setup_for_cli(
    ingress: &Ingress,
    query: &std::collections::HashMap<String, String>,
) -> Result<Response<Body>, String> {
    let decode = |k: &str| {
        query
            .get(k)
            .and_then(|v| crate::http_util::percent_decode(v))
    };
    let runtime = decode("runtime").ok_or("say which runtime: ?runtime=R")?;
    let (proxy, mirror) = bound(ingress);
    let reach = match decode("address") {
        Some(a) => {
            crate::admin::setup::Reach::given(&a, proxy, mirror, "the address given with --address")
        }
        None => crate::admin::setup::Reach::of_listeners(proxy, mirror, hostname().as_deref()),
    };
    let s = crate::admin::setup::snippet(&runtime, &reach, &ingress.config, ingress.ca.cert_pem())?;
    let mut r = Response::new(full(s));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(r)
}

/// The metrics text, with live gauges read now.
fn render_metrics(ingress: &Ingress) -> String {
    let cache = &ingress.api.cache;
    let m = &ingress.api.metrics;
    m.fills_in_flight.set(cache.fills.in_flight() as i64);
    m.cache_size.set(cache.store.index.total() as i64);
    m.cache_objects.set(cache.store.index.len() as i64);
    m.set_caching_paused(cache.paused());
    m.cache_max_size.set(cache.limits.max_size as i64);
    m.min_free.set(cache.limits.min_free as i64);
    if let Some(free) = cache.store.free_space() {
        m.disk_free.set(free as i64);
    }
    let max = m.connections_max.get().max(0) as usize;
    let free = ingress.connections.available_permits();
    m.connections_open.set(max.saturating_sub(free) as i64);
    let minted = ingress.ca.minted();
    let counted = m.certificates_minted.get();
    if minted > counted {
        m.certificates_minted.inc_by(minted - counted);
    }
    m.render()
}

/// `/`, `/status` (HTML) and `/status.json`: see `admin::status`.
async fn status(ingress: &Arc<Ingress>, path: &str) -> Response<Body> {
    let st = ingress.clone();
    let max = st.api.metrics.connections_max.get().max(0) as u64;
    let open = max.saturating_sub(st.connections.available_permits() as u64);
    let as_json = path == "/status.json";
    let rendered = tokio::task::spawn_blocking(move || {
        let registries: Vec<crate::oci::Registry> = st
            .config
            .registries()
            .iter()
            .map(|r| r.registry())
            .collect();
        let s = crate::admin::status::gather(
            &st.api,
            &registries,
            crate::admin::status::Connections { open, max },
            crate::clock::now_ms(),
        );
        if as_json {
            serde_json::to_string(&s).unwrap_or_default()
        } else {
            crate::admin::status::html(&s)
        }
    })
    .await;
    let Ok(body) = rendered else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "status task failed");
    };
    let mut r = Response::new(full(body));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(if as_json {
            "application/json"
        } else {
            "text/html; charset=utf-8"
        }),
    );
    // The page is live data: never cached; and it frames nothing, runs nothing.
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r.headers_mut().insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'",
        ),
    );
    r.headers_mut().insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_string_pretty(v).unwrap_or_default()));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `POST /admin/verify`: the verify runs in the blocking pool and its events stream out as
/// newline-delimited JSON (`admin::VerifyEvent`), with a progress line at least every second
/// so that the client can tell a long verify from a stuck server. A client that goes away
/// does not stop it: corrupt objects are still removed.
fn verify_stream(ingress: &Arc<Ingress>) -> Response<Body> {
    use crate::admin::{VerifyEvent, VERIFY_PROGRESS_EVERY};
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let store = ingress.api.cache.store.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<VerifyEvent>(256);
    let progress = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let seen = progress.clone();
    tokio::task::spawn_blocking(move || {
        let _ = tx.blocking_send(VerifyEvent::Start {
            objects: store.index.len() as u64,
            bytes: store.index.total(),
        });
        let mut checked = 0u64;
        let result = crate::admin::verify(&store, |bytes, d, ok| {
            checked += 1;
            seen.0.store(checked, Relaxed);
            seen.1.store(bytes, Relaxed);
            if !ok {
                tracing::warn!(digest = %d, "verify: corrupt object removed");
                let _ = tx.blocking_send(VerifyEvent::Corrupt {
                    digest: d.to_string(),
                });
            }
            if checked.is_multiple_of(VERIFY_PROGRESS_EVERY) {
                let _ = tx.blocking_send(VerifyEvent::Progress { checked, bytes });
            }
        });
        let _ = tx.blocking_send(match result {
            Ok(report) => VerifyEvent::Done(report),
            Err(e) => VerifyEvent::Failed {
                message: e.to_string(),
            },
        });
    });
    let every = std::time::Duration::from_secs(1);
    let ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let lines = futures_util::stream::unfold(
        (rx, ticker, progress, false),
        |(mut rx, mut ticker, progress, finished)| async move {
            if finished {
                return None;
            }
            // Events first: a tick never reports a count past one still queued.
            let event = tokio::select! {
                biased;
                e = rx.recv() => e?,
                _ = ticker.tick() => VerifyEvent::Progress {
                    checked: progress.0.load(Relaxed),
                    bytes: progress.1.load(Relaxed),
                },
            };
            let finished = matches!(event, VerifyEvent::Done(_) | VerifyEvent::Failed { .. });
            let mut line = serde_json::to_vec(&event).unwrap_or_default();
            line.push(b'\n');
            let frame = http_body::Frame::data(bytes::Bytes::from(line));
            Some((
                Ok::<_, crate::http_util::BoxError>(frame),
                (rx, ticker, progress, finished),
            ))
        },
    );
    let mut r = Response::new(BodyExt::boxed_unsync(http_body_util::StreamBody::new(
        lines,
    )));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// `POST /admin/refresh?ref=REF`: the tag revalidated upstream now.
async fn refresh(ingress: &Arc<Ingress>, query: &str) -> Response<Body> {
    let image = query
        .split('&')
        .find_map(|p| p.strip_prefix("ref="))
        .and_then(crate::http_util::percent_decode)
        .ok_or_else(|| "say which image: ?ref=REF".to_owned())
        .and_then(|r| r.parse::<crate::oci::ImageRef>().map_err(|e| e.to_string()));
    let key = match image.map(|i| (i.tag_key(), i)) {
        Ok((Some(key), _)) => key,
        Ok((None, image)) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("{image} names a digest, which never changes: refresh takes a tag"),
            )
        }
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    match ingress.api.refresh(&key).await {
        Ok(variants) => json(&crate::admin::RefreshReport {
            image: key.to_string(),
            variants: variants
                .into_iter()
                .map(|(before, now)| crate::admin::RefreshedVariant {
                    before: before.map(|d| d.to_string()),
                    now: now.to_string(),
                })
                .collect(),
        }),
        Err(e) => text(StatusCode::BAD_GATEWAY, &e),
    }
}

/// `POST /admin/prefetch?ref=REF&ref=...[&platform=OS/ARCH[/VARIANT]...|&all_platforms=1]`,
/// with the upstream credentials, if any, as the request's `Authorization: Basic` (a header,
/// never the query, which may be logged): the images are prefetched one after another and
/// the events stream out as newline-delimited JSON (`PrefetchEvent`), a `working` line at
/// least every two seconds. A client that goes away does not stop it.
fn prefetch_stream(ingress: &Arc<Ingress>, req: &Request<Incoming>) -> Response<Body> {
    use crate::registry_api::prefetch::{Platforms, PrefetchEvent};
    let mut images = Vec::new();
    let mut platforms = Vec::new();
    let mut all = false;
    for (k, v) in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
    {
        let Some(v) = crate::http_util::percent_decode(v) else {
            return text(
                StatusCode::BAD_REQUEST,
                "a query value is not percent-encoded UTF-8",
            );
        };
        match k {
            "ref" => images.push(v),
            "platform" => match crate::oci::platform::parse_list(&v) {
                Ok(l) => platforms.extend(l),
                Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
            },
            "all_platforms" => all = v == "1" || v == "true",
            _ => {}
        }
    }
    if images.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "say which images: ?ref=REF&ref=...",
        );
    }
    let platforms = match (all, platforms.is_empty()) {
        (true, true) => Platforms::All,
        (true, false) => {
            return text(
                StatusCode::BAD_REQUEST,
                "platform and all_platforms exclude each other",
            )
        }
        (false, true) => Platforms::Only(ingress.config.prefetch.platform_list()),
        (false, false) => Platforms::Only(platforms),
    };
    let creds = match req.headers().get(http::header::AUTHORIZATION) {
        None => None,
        Some(v) => match basic_credentials(v) {
            Some(c) => Some(c),
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "Authorization must be Basic base64(user:password)",
                )
            }
        },
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<PrefetchEvent>();
    let api = ingress.api.clone();
    ingress.api.spawn_background(async move {
        for image in images {
            match image.parse::<crate::oci::ImageRef>() {
                Ok(r) => {
                    let tx = tx.clone();
                    let events = move |e: PrefetchEvent| {
                        let _ = tx.send(e);
                    };
                    let _ = api.prefetch(&r, &platforms, creds.clone(), &events).await;
                }
                Err(e) => {
                    let _ = tx.send(PrefetchEvent::Failed {
                        image,
                        reason: e.to_string(),
                    });
                }
            }
        }
    });
    let every = std::time::Duration::from_secs(2);
    let ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let lines = futures_util::stream::unfold((rx, ticker), |(mut rx, mut ticker)| async move {
        let event = tokio::select! {
            biased;
            e = rx.recv() => e?,
            _ = ticker.tick() => PrefetchEvent::Working,
        };
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        let frame = http_body::Frame::data(bytes::Bytes::from(line));
        Some((Ok::<_, crate::http_util::BoxError>(frame), (rx, ticker)))
    });
    let mut r = Response::new(BodyExt::boxed_unsync(http_body_util::StreamBody::new(
        lines,
    )));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// `Basic base64(user:password)` as credentials.
fn basic_credentials(v: &HeaderValue) -> Option<crate::settings::Credentials> {
    use base64::Engine;
    let b64 = v.to_str().ok()?.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (user, pass) = raw.split_once(':')?;
    Some(crate::settings::Credentials::new(user, pass))
}

/// `/admin/*`: the running server's side of `stowage cache ...`.
async fn admin(ingress: &Arc<Ingress>, req: &Request<Incoming>) -> Response<Body> {
    use crate::admin;
    if req.method() == Method::POST && req.uri().path() == "/admin/verify" {
        return verify_stream(ingress);
    }
    if req.method() == Method::POST && req.uri().path() == "/admin/prefetch" {
        return prefetch_stream(ingress, req);
    }
    if req.method() == Method::POST && req.uri().path() == "/admin/refresh" {
        return refresh(ingress, req.uri().query().unwrap_or("")).await;
    }
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
            (Method::GET, "/admin/setup") => setup_for_cli(&st, &query)?,
            (Method::GET, "/admin/ls") => json(&admin::list(store).map_err(|e| e.to_string())?),
            (method, "/admin/forget" | "/admin/history" | "/admin/pin" | "/admin/unpin") => {
                let image: crate::oci::ImageRef = query
                    .get("ref")
                    .and_then(|v| crate::http_util::percent_decode(v))
                    .ok_or("say which image: ?ref=REF")?
                    .parse()
                    .map_err(|e: crate::oci::ImageRefError| e.to_string())?;
                match (method, path.as_str()) {
                    (Method::POST, "/admin/forget") => {
                        if let Some(key) = image.tag_key() {
                            st.api.forget_negative(&key);
                        }
                        json(&admin::forget(store, &image)?)
                    }
                    (Method::GET, "/admin/history") => json(&admin::history(store, &image)?),
                    (Method::POST, "/admin/pin") => {
                        json(&admin::pin(store, &image, true).map_err(|e| e.to_string())?)
                    }
                    (Method::POST, "/admin/unpin") => {
                        json(&admin::pin(store, &image, false).map_err(|e| e.to_string())?)
                    }
                    _ => text(StatusCode::METHOD_NOT_ALLOWED, "history is GET; forget, pin, unpin are POST"),
                }
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
                "admin: GET info, GET setup?runtime=&address=, GET stats, GET ls, POST verify, POST prune?max_size=&older_than=, POST forget|pin|unpin|refresh?ref=, GET history?ref=, POST prefetch?ref=&platform=|all_platforms=1",
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
