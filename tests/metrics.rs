//! The metrics operators asked for (issue 18): latency histograms by kind and outcome, the
//! `code` label, open connections against `max_connections`, refusals by reason, the
//! caching-paused gauge, build info, process metrics, and the error and quota series that
//! exist at zero before anything has gone wrong. In-process, against the fake registry.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// Polls `/metrics` until `check` holds (requests are counted when their body ends).
async fn metrics_until(client: &ProxyClient, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = client.proxy_get("/metrics").await.text();
        if check(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a sample line for `series` (name and labels exactly as rendered) exists.
fn has_series(text: &str, series: &str) -> bool {
    text.lines()
        .any(|l| l.rsplit_once(' ').is_some_and(|(s, _)| s == series))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_codes_connections_and_refusals_are_measured() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(300_000, 18);
    let digest = quay.push_blob("team/app", data.clone());
    let stowage = Stowage::builder()
        .trust(&ca)
        .proxy("max_connections = 77")
        .toml(&format!(
            "\n[[registry]]\nhost = \"quay.io:{}\"\ndeny = [\"team/secret\"]\n",
            quay.port()
        ))
        .start()
        .await;
    let client = stowage.client();
    let quay_label = format!("quay.io:{}", quay.port());

    // Before any request: build info, process metrics, and zero series for errors,
    // refusals and the quota guard of every configured registry.
    let m0 = client.proxy_get("/metrics").await.text();
    assert!(m0.contains("stowage_build_info{version=\""), "{m0}");
    for series in [
        format!(r#"stowage_upstream_errors_total{{registry="{quay_label}",status="429"}}"#),
        format!(r#"stowage_upstream_errors_total{{registry="{quay_label}",status="connect"}}"#),
        r#"stowage_upstream_errors_total{registry="registry-1.docker.io",status="503"}"#.into(),
        format!(r#"stowage_quota_guard_engaged{{registry="{quay_label}"}}"#),
        r#"stowage_refusals_total{reason="tunnel_port"}"#.into(),
        r#"stowage_refusals_total{reason="denied_repository"}"#.into(),
        r#"stowage_caching_paused{reason="disk_full"}"#.into(),
    ] {
        assert!(has_series(&m0, &series), "no {series} at start:\n{m0}");
    }
    assert_eq!(metric(&m0, "stowage_upstream_errors_total", &[]), 0.0);
    assert_eq!(metric(&m0, "stowage_refusals_total", &[]), 0.0);
    assert_eq!(metric(&m0, "stowage_caching_paused", &[]), 0.0);
    assert_eq!(metric(&m0, "stowage_connections_max", &[]), 77.0, "{m0}");
    assert!(
        metric(&m0, "process_resident_memory_bytes", &[]) > 0.0,
        "{m0}"
    );
    assert!(metric(&m0, "process_open_fds", &[]) > 0.0, "{m0}");

    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    assert_eq!(bounded("miss", s.blob(&digest)).await.x_cache(), "miss");
    eventually("stored", || stowage.is_cached(&digest)).await;
    assert_eq!(bounded("hit", s.blob(&digest)).await.x_cache(), "hit");
    let blob = |outcome: &'static str| {
        move |m: &str| {
            metric(
                m,
                "stowage_request_duration_seconds_count",
                &[("kind", "blob"), ("outcome", outcome)],
            )
        }
    };
    let m1 = metrics_until(&client, "the hit's latency", |m| blob("hit")(m) == 1.0).await;
    assert_eq!(blob("miss")(&m1), 1.0, "{m1}");
    for outcome in ["miss", "hit"] {
        let labels = [("kind", "blob"), ("outcome", outcome)];
        assert_eq!(
            metric(&m1, "stowage_request_first_byte_seconds_count", &labels),
            1.0,
            "{m1}"
        );
        let first = metric(&m1, "stowage_request_first_byte_seconds_sum", &labels);
        let total = metric(&m1, "stowage_request_duration_seconds_sum", &labels);
        assert!(
            first > 0.0 && first <= total,
            "{outcome}: {first} > {total}"
        );
        // The +Inf bucket holds every observation.
        assert_eq!(
            metric(
                &m1,
                "stowage_request_duration_seconds_bucket",
                &[("kind", "blob"), ("outcome", outcome), ("le", "+Inf")]
            ),
            1.0,
            "{m1}"
        );
        assert_eq!(
            metric(
                &m1,
                "stowage_requests_total",
                &[("kind", "blob"), ("outcome", outcome), ("code", "200")]
            ),
            1.0,
            "{m1}"
        );
    }
    // This scrape's own connection holds a place. (A CONNECT tunnel gives its place back
    // once the tunnel is upgraded: the gauge counts what `max_connections` bounds.)
    assert!(metric(&m1, "stowage_connections_open", &[]) >= 1.0, "{m1}");

    // A missing blob: a 404 under its own code.
    let absent = sha256_digest(b"not there");
    assert_eq!(s.blob(&absent).await.status, StatusCode::NOT_FOUND);
    let m2 = metrics_until(&client, "the 404", |m| {
        metric(m, "stowage_requests_total", &[("code", "404")]) == 1.0
    })
    .await;
    assert_eq!(
        metric(&m2, "stowage_requests_total", &[("code", "2xx")]),
        0.0
    );

    // Refusals, each under its reason.
    let (_, status) = client.connect_raw("tunnel.test:8443").await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, status) = client.connect_raw(&stowage.addr.to_string()).await.unwrap();
    assert_eq!(status, StatusCode::LOOP_DETECTED);
    let denied = Session::login(&client, "quay.io", quay.port(), "team/secret", Alpn::Http11).await;
    let r = denied.blob(&digest).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let refused = |reason: &'static str| {
        move |m: &str| metric(m, "stowage_refusals_total", &[("reason", reason)])
    };
    let m3 = metrics_until(&client, "the denied repository", |m| {
        refused("denied_repository")(m) >= 1.0
    })
    .await;
    assert_eq!(refused("tunnel_port")(&m3), 1.0, "{m3}");
    assert_eq!(refused("loop")(&m3), 1.0, "{m3}");
    assert_eq!(refused("allow_list")(&m3), 0.0, "{m3}");
    assert_eq!(refused("proxy_auth")(&m3), 0.0, "{m3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caching_paused_and_proxy_auth_refusals_show() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap()),
    )
    .unwrap();
    let stowage = Stowage::builder()
        .trust(&ca)
        // More free space than any test machine has: caching is paused from the start.
        .cache("min_free = \"1000000TiB\"")
        .proxy(&format!("users_file = {:?}", users.to_str().unwrap()))
        .start()
        .await;
    let client = stowage.client();
    let (_, status) = client.connect_raw("quay.io:443").await.unwrap();
    assert_eq!(status, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    // With proxy users, what the proxy knows (metrics, the status page and its repository
    // names and errors) is for them too: a browser or Prometheus sends `Authorization`.
    use base64::Engine as _;
    let basic = |u: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(u)
        )
    };
    for path in ["/metrics", "/", "/status", "/status.json"] {
        let r = client.proxy_get(path).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{path} without credentials"
        );
        assert_eq!(
            r.headers
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Basic realm=\"stowage\""),
            "{path}"
        );
        let r = client
            .proxy_get_with(path, &[("authorization", &basic("alice:wrong"))])
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{path} with a wrong password"
        );
        for header in ["authorization", "proxy-authorization"] {
            let r = client
                .proxy_get_with(path, &[(header, &basic("alice:pw"))])
                .await;
            assert_eq!(r.status, StatusCode::OK, "{path} with {header}");
        }
    }
    assert_eq!(client.proxy_get("/healthz").await.status, StatusCode::OK);
    assert_eq!(client.proxy_get("/ca.crt").await.status, StatusCode::OK);
    let m = client
        .proxy_get_with("/metrics", &[("authorization", &basic("alice:pw"))])
        .await
        .text();
    assert_eq!(
        metric(&m, "stowage_caching_paused", &[("reason", "disk_full")]),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "stowage_caching_paused", &[("reason", "write_error")]),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "stowage_refusals_total", &[("reason", "proxy_auth")]),
        1.0,
        "{m}"
    );
}
