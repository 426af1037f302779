//! The forward-proxy listener: `CONNECT`, absolute-form `http://` requests, and the
//! proxy's own endpoints.
//!
//! `CONNECT` to a registry or auth host is answered `200`, then the tunnel's ClientHello is
//! read (`LazyConfigAcceptor`), the leaf for the CONNECT host is fetched from the CA's cache,
//! TLS is terminated, and HTTP/1.1 or h2 inside is served by `registry::handle`. `CONNECT`
//! to any other host is a blind TCP tunnel (or `403`). Origin-form requests are the proxy's
//! own: `/ca.crt`, `/healthz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tracing::Instrument;

use crate::config::OtherHosts;
use crate::oci::{Registry, Scheme};
use crate::registry::{self, Target};
use crate::response::{empty, full, text, Body};
use crate::server::{HostKind, State};

/// Spawns hyper's background tasks (one per h2 stream) inside the span of the connection
/// that made them, so their log lines, the access log included, name the client.
#[derive(Clone)]
pub struct SpanExecutor(tracing::Span);

impl<F> hyper::rt::Executor<F> for SpanExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut.instrument(self.0.clone()));
    }
}

/// The HTTP/1.1 + h2 server settings every listener uses; call it inside the connection's
/// span.
pub fn http_builder(state: &State) -> auto::Builder<SpanExecutor> {
    let mut b = auto::Builder::new(SpanExecutor(tracing::Span::current()));
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.header_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(state.idle_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20);
    b
}

/// Serves one client connection to the proxy listener until it closes or shutdown ends it.
pub async fn serve_connection(state: Arc<State>, stream: TcpStream, peer: SocketAddr) {
    let svc_state = state.clone();
    let svc = service_fn(move |req| {
        let state = svc_state.clone();
        async move { Ok::<_, Infallible>(proxy_request(state, req, peer).await) }
    });
    let builder = http_builder(&state);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = state.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// Serves HTTP/1.1 or h2 on `io` with `svc` until the peer closes or shutdown ends it.
pub async fn serve_until_shutdown<IO, S>(state: &State, io: IO, svc: S)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = http_builder(state);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = state.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Serves the registry API for `target` on a terminated TLS stream.
pub async fn serve_registry<IO>(state: Arc<State>, io: IO, target: Arc<Target>)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let looped = crate::mirror::loop_check(&state, &target).await.is_some();
    let svc_state = state.clone();
    let svc = service_fn(move |req| {
        let (state, target) = (svc_state.clone(), target.clone());
        async move {
            if looped {
                if let Some(resp) = crate::mirror::loop_check(&state, &target).await {
                    return Ok::<_, Infallible>(resp);
                }
            }
            Ok::<_, Infallible>(registry::handle(state, target, req).await)
        }
    });
    serve_until_shutdown(&state, io, svc).await
}

async fn proxy_request(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let proxied = req.method() == Method::CONNECT || req.uri().scheme().is_some();
    if proxied {
        if let Some(users) = &state.proxy_users {
            if !users
                .check(req.headers().get(http::header::PROXY_AUTHORIZATION))
                .await
            {
                tracing::info!(%peer, "proxy authentication required or failed");
                let mut r = text(
                    StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                    "proxy authentication required",
                );
                r.headers_mut().insert(
                    http::header::PROXY_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"stowage\""),
                );
                return r;
            }
        }
    }
    if req.method() == Method::CONNECT {
        return connect(state, req, peer).await;
    }
    if req.uri().scheme().is_some() {
        return absolute_form(state, req).await;
    }
    if req.uri().path().starts_with("/admin/") {
        if !peer.ip().is_loopback() {
            return text(
                StatusCode::FORBIDDEN,
                "admin endpoints answer loopback clients only",
            );
        }
        return admin(state, req).await;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/ca.crt") => {
            let mut r = Response::new(full(state.ca.cert_pem().to_owned()));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/x-pem-file"));
            r
        }
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET, p) if p.starts_with("/setup/") => {
            let runtime = &p["/setup/".len()..];
            let address = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
                .unwrap_or_else(|| state.proxy_addr.to_string());
            match crate::setup::snippet(runtime, &address, &state.config, state.ca.cert_pem()) {
                Ok(s) => text(StatusCode::OK, s.trim_end()),
                Err(e) => text(StatusCode::NOT_FOUND, &e),
            }
        }
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(full(state.render_metrics()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        (_, "/ca.crt" | "/healthz") => text(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: this is Stowage, a registry proxy. Use it as HTTPS_PROXY; GET /ca.crt for its CA, /healthz for health",
        ),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_string_pretty(v).unwrap_or_default()));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `/admin/*`: the running server's side of `stowage cache ...`.
async fn admin(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
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
    let st = state.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<Response<Body>, String> {
        let store = &st.store;
        Ok(match (method, path.as_str()) {
            (Method::GET, "/admin/stats") => {
                let mut s = admin::stats(store, st.max_size);
                s.since_start = Some(st.metrics.traffic());
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
                    .map(|v| v.parse::<crate::config::Size>())
                    .transpose()?
                    .map(|s| s.0);
                let older = query
                    .get("older_than")
                    .map(|v| v.parse::<crate::config::HumanDuration>())
                    .transpose()?
                    .map(|d| d.0);
                json(&admin::prune(store, max, older).map_err(|e| e.to_string())?)
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "admin: GET stats, GET ls, POST verify, POST prune?max_size=&older_than=",
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

/// The CONNECT target as an HTTPS origin (normalised by `oci::origin`).
fn connect_target(req: &Request<Incoming>) -> Option<Registry> {
    Registry::from_authority(Scheme::Https, req.uri().authority()?.as_str()).ok()
}

async fn connect(state: Arc<State>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let Some(target) = connect_target(&req) else {
        return text(StatusCode::BAD_REQUEST, "CONNECT needs a host:port target");
    };
    let port = target.port();
    let host = target.host().as_str().to_owned();
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        if state.is_own_address(&SocketAddr::new(ip, port)) {
            return text(
                StatusCode::LOOP_DETECTED,
                "CONNECT to this proxy's own address is refused",
            );
        }
    }
    match state.host_kind(target.host()) {
        Some(kind) => {
            let span = tracing::info_span!("tunnel", registry = %target, mode = "tls");
            let st = state.clone();
            state.tasks.spawn(
                async move {
                    match hyper::upgrade::on(req).await {
                        Ok(upgraded) => {
                            terminate_tls(st, TokioIo::new(upgraded), target, kind).await
                        }
                        Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                    }
                }
                .instrument(span),
            );
            Response::new(empty())
        }
        None if state.other_hosts == OtherHosts::Deny => {
            tracing::info!(%peer, %host, port, "CONNECT refused: not a registry");
            text(
                StatusCode::FORBIDDEN,
                "this proxy only serves container registries",
            )
        }
        None if !state.config.proxy.tunnel_ports.contains(&port) => {
            tracing::info!(%peer, %host, port, "CONNECT refused: port not in proxy.tunnel_ports");
            text(
                StatusCode::FORBIDDEN,
                "tunnels to this port are not allowed (proxy.tunnel_ports)",
            )
        }
        None => {
            // A name (or pin) that leads back to a listener of ours would turn a remote
            // client into a loopback one, the kind allowed to use /admin.
            if let Ok(addrs) = state.upstream.resolver().resolve(&host, port).await {
                if addrs.iter().any(|a| state.is_own_address(a)) {
                    tracing::info!(%peer, %host, port, "CONNECT refused: resolves to this proxy");
                    return text(
                        StatusCode::LOOP_DETECTED,
                        "CONNECT to this proxy's own address is refused",
                    );
                }
            }
            let upstream = match state.upstream.connect_tcp(&host, port).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%host, port, error = %e, "tunnel connect failed");
                    return text(StatusCode::BAD_GATEWAY, &e.to_string());
                }
            };
            if upstream.peer_addr().is_ok_and(|a| state.is_own_address(&a)) {
                tracing::info!(%peer, %host, port, "CONNECT refused: connected to this proxy");
                return text(
                    StatusCode::LOOP_DETECTED,
                    "CONNECT to this proxy's own address is refused",
                );
            }
            let span = tracing::info_span!("tunnel", %host, port, mode = "blind");
            let st = state.clone();
            state.tasks.spawn(
                async move {
                    match hyper::upgrade::on(req).await {
                        Ok(upgraded) => {
                            let (up, down) =
                                relay(TokioIo::new(upgraded), upstream, st.idle_timeout, &st).await;
                            tracing::debug!(bytes_up = up, bytes_down = down, "tunnel closed");
                        }
                        Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                    }
                }
                .instrument(span),
            );
            Response::new(empty())
        }
    }
}

/// Terminates TLS inside a CONNECT tunnel and serves the registry API for `host:port`.
async fn terminate_tls<IO>(state: Arc<State>, io: IO, registry: Registry, kind: HostKind)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout(state.header_timeout, acceptor).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return tracing::info!(error = %e, "TLS ClientHello rejected"),
        Err(_) => return tracing::info!("no TLS ClientHello in time"),
    };
    let host = registry.host().as_str();
    if let Some(sni) = start.client_hello().server_name() {
        if !sni.eq_ignore_ascii_case(host) {
            tracing::debug!(
                sni,
                "SNI differs from the CONNECT host; using the CONNECT host"
            );
        }
    }
    let config = match state.ca.server_config(host).await {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "cannot mint a certificate"),
    };
    let tls = match tokio::time::timeout(state.header_timeout, start.into_stream(config)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return tracing::info!(error = %e, "TLS handshake failed"),
        Err(_) => return tracing::info!("TLS handshake timed out"),
    };
    let target = Arc::new(Target {
        registry,
        auth_host: kind == HostKind::AuthHost,
        mirror: false,
    });
    serve_registry(state, TokioIo::new(tls), target).await
}

/// Plain-HTTP requests in absolute form (`GET http://host/...`): registries speaking plain
/// HTTP get the registry path; anything else is forwarded or refused like a tunnel.
async fn absolute_form(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let uri = req.uri();
    if uri.scheme_str() != Some("http") {
        return text(
            StatusCode::BAD_REQUEST,
            "only http:// URLs can be proxied in absolute form; use CONNECT for https",
        );
    }
    let Some(registry) = Registry::of_uri(uri) else {
        return text(StatusCode::BAD_REQUEST, "request URL has no valid host");
    };
    let kind = state.host_kind(registry.host());
    if kind.is_none() && state.other_hosts == OtherHosts::Deny {
        return text(
            StatusCode::FORBIDDEN,
            "this proxy only serves container registries",
        );
    }
    let target = Arc::new(Target {
        registry,
        auth_host: kind != Some(HostKind::Registry),
        mirror: false,
    });
    // Forwarding to ourselves would loop, and would reach /admin as a loopback client.
    if let Some(refused) = crate::mirror::loop_check(&state, &target).await {
        return refused;
    }
    registry::handle(state, target, req).await
}

/// Copies bytes both ways until either side closes, or neither sends anything for `idle`
/// or shutdown is requested. Returns bytes client→upstream and upstream→client.
async fn relay<A, B>(client: A, upstream: B, idle: Duration, state: &State) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = pump(&mut cr, &mut uw, &last, epoch, idle);
    let down = pump(&mut ur, &mut cw, &last, epoch, idle);
    tokio::select! {
        (a, b) = async { tokio::join!(up, down) } => (a, b),
        () = state.shutdown.cancelled() => (0, 0),
    }
}

async fn pump<R, W>(r: &mut R, w: &mut W, last: &AtomicU64, epoch: Instant, idle: Duration) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match tokio::time::timeout(idle, r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => {
                // Idle in this direction; the tunnel lives while the other one is active.
                let quiet = epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    break;
                }
                continue;
            }
        };
        last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
    }
    let _ = w.shutdown().await;
    total
}
