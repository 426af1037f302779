//! Issue 14, "What got through": doors a red-team pass found open.
//!
//! - Redirects never lead Stowage to loopback, link-local or unspecified addresses or to
//!   its own listeners (a `[upstream.resolve]` pin excepted), nor from `https://` down to
//!   plain `http://`.
//! - Absolute-form `http://` requests to hosts that are not registries obey the tunnel
//!   rules (`other_hosts`, `tunnel_ports`, no loopback), and host names that are not
//!   configured registries never become `registry` labels in `/metrics`.
//!
//! Everything runs on 127.0.0.1 with the fixture's pins; the fakes record what reached
//! them, so each test can say "this endpoint was never reached".

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::tls::{Body, Handler, TlsServer};
use common::*;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, LOCATION, USER_AGENT};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// One request a fake saw: the authority it was addressed to, the path and query, and
/// its `Authorization`.
#[derive(Clone, Debug)]
#[allow(dead_code)] // read through `Debug`, in failure messages
struct Seen {
    authority: String,
    path: String,
    authorization: Option<String>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn record(log: &Log, req: &Request<Incoming>) {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    log.lock().unwrap().push(Seen {
        authority,
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        authorization: req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
}

fn respond(
    status: StatusCode,
    body: &str,
    headers: &[(http::HeaderName, String)],
) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_owned()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in headers {
        r.headers_mut()
            .insert(k.clone(), HeaderValue::from_str(v).unwrap());
    }
    r
}

/// A plain-HTTP server on 127.0.0.1 that records every request; `answer` builds the reply.
async fn plain_server(
    answer: impl Fn(&Request<Incoming>) -> Response<Body> + Send + Sync + 'static,
) -> (
    SocketAddr,
    Log,
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let log: Log = Arc::default();
    let answer = Arc::new(answer);
    let l = log.clone();
    let (addr, accepted, task) = counting_server(move |tcp: TcpStream| {
        let (log, answer) = (l.clone(), answer.clone());
        async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (log, answer) = (log.clone(), answer.clone());
                async move {
                    record(&log, &req);
                    Ok::<_, Infallible>(answer(&req))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        }
    })
    .await;
    (addr, log, accepted, task)
}

/// A TLS server (certificate for every fake name) that records every request.
async fn tls_server(
    ca: &TestCa,
    answer: impl Fn(SocketAddr, &Request<Incoming>) -> Response<Body> + Send + Sync + 'static,
) -> (TlsServer, Log) {
    let log: Log = Arc::default();
    let l = log.clone();
    let answer = Arc::new(answer);
    let server = TlsServer::start(ca.fake_hosts_config(), move |addr| -> Handler {
        Arc::new(move |req| {
            let (log, answer) = (l.clone(), answer.clone());
            Box::pin(async move {
                record(&log, &req);
                answer(addr, &req)
            })
        })
    })
    .await;
    (server, log)
}

/// One plain HTTP/1.1 request to the proxy at `proxy`; `target` is sent as the request
/// target as it is (an absolute `http://` URL: a forward-proxy request).
async fn absolute(proxy: SocketAddr, target: &str) -> Resp {
    let tcp = bounded("connect", TcpStream::connect(proxy))
        .await
        .expect("connect to proxy");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("http/1.1 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let uri: http::Uri = target.parse().expect("request target");
    let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header(HOST, host)
        .header(USER_AGENT, TEST_USER_AGENT)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = bounded(target, send.send_request(req))
        .await
        .unwrap_or_else(|e| panic!("{target}: {e}"));
    client::read_response(resp).await
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const LOOPBACK_CONTENT: &str = r#"{"schemaVersion":2,"served_by":"a loopback-only service"}"#;

// Item 2: a redirect never takes Stowage to loopback, link-local or unspecified addresses,
// to its own listeners, or from https:// down to http://, unless a pin names the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_loopback_own_listeners_or_plain_http_are_refused() {
    let ca = TestCa::new();
    // Something worth stealing in the admin listing.
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    quay.push_image("team/secret", "1", &[pseudo_random(20_000, 1401)]);
    let evil_blob = quay.push_blob("team/secret", pseudo_random(10_000, 1402));
    // A loopback-only service (TLS, every fake name and localhost) and a plain one.
    let (service, service_seen) = tls_server(&ca, |_, _| {
        respond(
            StatusCode::OK,
            LOOPBACK_CONTENT,
            &[(CONTENT_TYPE, OCI_MANIFEST.into())],
        )
    })
    .await;
    let (plain, plain_seen, _, _task) = plain_server(|_| {
        respond(
            StatusCode::OK,
            LOOPBACK_CONTENT,
            &[(CONTENT_TYPE, OCI_MANIFEST.into())],
        )
    })
    .await;
    let table: Arc<Mutex<Vec<(&'static str, String)>>> = Arc::default();
    let t = table.clone();
    let (evil, _) = tls_server(&ca, move |_, req| {
        let path = req.uri().path();
        let table = t.lock().unwrap();
        match table
            .iter()
            .find(|(case, _)| path.starts_with(&format!("/v2/evil/{case}/")))
        {
            Some((_, location)) => respond(
                StatusCode::TEMPORARY_REDIRECT,
                "",
                &[(LOCATION, location.clone())],
            ),
            None => respond(StatusCode::NOT_FOUND, "{}", &[]),
        }
    })
    .await;
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let pulled = pull(
        &client,
        "quay.io",
        quay.port(),
        "team/secret",
        "1",
        Alpn::Http11,
    )
    .await;
    assert_eq!(pulled.manifest.status, StatusCode::OK);
    let listing = client.proxy_get("/admin/ls").await.text();
    assert!(listing.contains("team/secret"), "{listing}");
    let own = stowage.addr.port();
    let sp = service.port();
    let cases: Vec<(&'static str, String)> = vec![
        ("admin", format!("http://127.0.0.1:{own}/admin/ls")),
        ("adminname", format!("https://tunnel.test:{own}/admin/ls")),
        (
            "loopback",
            format!("https://127.0.0.1:{sp}/v2/x/manifests/1"),
        ),
        ("loopback6", format!("https://[::1]:{sp}/v2/x/manifests/1")),
        (
            "mapped",
            format!("https://[::ffff:127.0.0.1]:{sp}/v2/x/manifests/1"),
        ),
        (
            "localhost",
            format!("https://localhost:{sp}/v2/x/manifests/1"),
        ),
        (
            "linklocal",
            "https://169.254.169.254/latest/meta-data/".to_owned(),
        ),
        (
            "unspecified",
            format!("https://0.0.0.0:{sp}/v2/x/manifests/1"),
        ),
        (
            "downgrade",
            format!("http://storage.test:{}/v2/x/manifests/1", plain.port()),
        ),
    ];
    *table.lock().unwrap() = cases.clone();
    table.lock().unwrap().push((
        "pinned",
        format!("https://storage.test:{sp}/v2/x/manifests/1"),
    ));
    let tunnel = client
        .tunnel("quay.io", evil.port(), Alpn::Http11)
        .await
        .unwrap();
    let mut bad = Vec::new();
    for (case, location) in &cases {
        let r = bounded(
            case,
            tunnel.request_raw(
                Method::GET,
                &format!("/v2/evil/{case}/manifests/latest"),
                &[("accept", OCI_MANIFEST)],
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        let text = r.text();
        if text.contains("team/secret") || text.contains("served_by") {
            bad.push(format!("{case}: {location} was served as content: {text}"));
            continue;
        }
        let message = serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|j| j["errors"][0]["message"].as_str().map(str::to_owned));
        let clear = message
            .as_deref()
            .is_some_and(|m| m.contains("redirect") && m.contains("refused"));
        if r.status != StatusCode::BAD_GATEWAY || !clear {
            bad.push(format!(
                "{case}: {location} answered {} {text} (want 502 with a registry JSON error saying the redirect was refused)",
                r.status
            ));
        }
    }
    // A pinned name is an operator's decision: followed.
    let r = tunnel
        .get(
            "/v2/evil/pinned/manifests/latest",
            &[("accept", OCI_MANIFEST)],
        )
        .await;
    if r.status != StatusCode::OK || r.text() != LOOPBACK_CONTENT {
        bad.push(format!(
            "pinned: a redirect to a pinned name answered {} {}",
            r.status,
            r.text()
        ));
    }
    // Only the pinned redirect may reach the services.
    let reached: Vec<Seen> = service_seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| !s.authority.starts_with("storage.test:"))
        .chain(plain_seen.lock().unwrap().iter())
        .cloned()
        .collect();
    if !reached.is_empty() {
        bad.push(format!("refused redirects still reached: {reached:?}"));
    }
    // A blob whose upstream redirects to the admin listing: refused too.
    quay.set_fault(
        &evil_blob,
        Fault::RedirectTo(format!("http://127.0.0.1:{own}/admin/ls")),
    );
    let s = Session::login(&client, "quay.io", quay.port(), "team/secret", Alpn::Http11).await;
    let r = bounded(
        "blob redirect",
        s.request_raw(Method::GET, &s.blob_path(&evil_blob), &[]),
    )
    .await
    .unwrap();
    if r.status != StatusCode::BAD_GATEWAY || r.text().contains("team/secret") {
        bad.push(format!(
            "blob redirected to /admin/ls answered {} {}{}",
            r.status,
            r.text(),
            r.body_error
                .as_ref()
                .map(|e| format!(" (then the body failed: {e})"))
                .unwrap_or_default()
        ));
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// A plain "loopback-only" HTTP service: answers 200 to everything and counts connections.
async fn loopback_service() -> (
    u16,
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let (addr, _, accepted, task) =
        plain_server(|_| respond(StatusCode::OK, "loopback service", &[])).await;
    (addr.port(), accepted, task)
}

// Item 3: absolute-form requests to hosts that are not registries obey the tunnel rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_forwarding_obeys_the_tunnel_rules() {
    let ca = TestCa::new();
    let (p, accepted, _svc) = loopback_service().await;
    let mut bad = Vec::new();
    let mut expect = |who: &str, r: Resp, want: StatusCode| {
        if r.status != want {
            bad.push(format!("{who}: {} {} (want {want})", r.status, r.text()));
        }
    };

    // Default tunnel_ports (443): neither a loopback literal nor a name on another port.
    let default = Stowage::start(&ca).await;
    for url in [
        format!("http://127.0.0.1:{p}/"),
        format!("http://tunnel.test:{p}/"),
        "http://tunnel.test:22/".to_owned(),
    ] {
        let r = absolute(default.addr, &url).await;
        expect(&format!("default, {url}"), r, StatusCode::FORBIDDEN);
    }

    // The port allowed: loopback (by literal or by an unpinned name) is still refused; a
    // pinned name is an operator's decision.
    let open = Stowage::builder()
        .trust(&ca)
        .tunnel_ports(&[p])
        .start()
        .await;
    for url in [
        format!("http://127.0.0.1:{p}/"),
        format!("http://[::ffff:127.0.0.1]:{p}/"),
        format!("http://localhost:{p}/"),
    ] {
        let r = absolute(open.addr, &url).await;
        expect(
            &format!("tunnel_ports = [{p}], {url}"),
            r,
            StatusCode::FORBIDDEN,
        );
    }
    let r = absolute(open.addr, &format!("http://tunnel.test:{p}/")).await;
    expect("tunnel_ports, pinned tunnel.test", r, StatusCode::OK);

    // other_hosts = "deny": nothing but registries.
    let deny = Stowage::builder()
        .trust(&ca)
        .other_hosts("deny")
        .tunnel_ports(&[p])
        .start()
        .await;
    let r = absolute(deny.addr, &format!("http://tunnel.test:{p}/")).await;
    expect("other_hosts = deny, tunnel.test", r, StatusCode::FORBIDDEN);

    let reached = accepted.load(Ordering::SeqCst);
    if reached != 1 {
        bad.push(format!(
            "the loopback service accepted {reached} connections; only the pinned request may reach it"
        ));
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

// Item 3, for CONNECT: a blind tunnel to a port in tunnel_ports still never reaches a
// loopback service (by literal, mapped literal or an unpinned name); a pinned name does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_tunnels_never_reach_internal_addresses_unless_pinned() {
    let ca = TestCa::new();
    let (p, accepted, _svc) = loopback_service().await;
    let open = Stowage::builder()
        .trust(&ca)
        .tunnel_ports(&[p])
        .start()
        .await;
    let client = open.client();
    let mut bad = Vec::new();
    for authority in [
        format!("127.0.0.1:{p}"),
        format!("127.0.0.2:{p}"),
        format!("[::ffff:127.0.0.1]:{p}"),
        format!("localhost:{p}"),
    ] {
        match client.connect_raw(&authority).await {
            Ok((_, StatusCode::FORBIDDEN)) => {}
            Ok((_, status)) => bad.push(format!("CONNECT {authority}: {status}, want 403")),
            Err(e) => bad.push(format!("CONNECT {authority}: {e}")),
        }
    }
    match client.connect_raw(&format!("tunnel.test:{p}")).await {
        Ok((_, StatusCode::OK)) => {}
        other => bad.push(format!("CONNECT to the pinned tunnel.test: {other:?}")),
    }
    eventually("the pinned tunnel connects", || {
        accepted.load(Ordering::SeqCst) >= 1
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let reached = accepted.load(Ordering::SeqCst);
    if reached != 1 {
        bad.push(format!(
            "the loopback service accepted {reached} connections; only the pinned tunnel may reach it"
        ));
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The `registry` label of every `stowage_requests_total` sample.
fn request_registries(metrics: &str) -> std::collections::BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("stowage_requests_total{"))
        .filter_map(|l| l.split("registry=\"").nth(1))
        .filter_map(|r| r.split('"').next())
        .map(str::to_owned)
        .collect()
}

// Item 3: host names that are not configured registries never become metric labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_are_not_registries_are_labelled_other_in_metrics() {
    let ca = TestCa::new();
    let (p, _, _svc) = loopback_service().await;
    let stowage = Stowage::builder()
        .trust(&ca)
        .tunnel_ports(&[p, 80])
        .start()
        .await;
    let client = stowage.client();
    let before = request_registries(&client.proxy_get("/metrics").await.text());
    for url in [
        format!("http://tunnel.test:{p}/x"),
        format!("http://storage.test:{p}/y"),
    ] {
        let r = absolute(stowage.addr, &url).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {}", r.text());
    }
    for name in ["a", "b", "c", "d", "e"] {
        let _ = absolute(stowage.addr, &format!("http://{name}.invalid/v2/")).await;
    }
    // Request counters move when a response body ends: poll, bounded.
    let mut metrics = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        metrics = client.proxy_get("/metrics").await.text();
        if metric(&metrics, "stowage_requests_total", &[("registry", "other")]) >= 2.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let after = request_registries(&metrics);
    let new: Vec<&String> = after
        .difference(&before)
        .filter(|r| r.as_str() != "other")
        .collect();
    assert!(
        new.is_empty(),
        "requests for hosts that are not registries made new registry labels: {new:?}"
    );
    assert!(
        metric(&metrics, "stowage_requests_total", &[("registry", "other")]) >= 2.0,
        "the two forwarded requests are counted under registry=\"other\": {after:?}"
    );
}
