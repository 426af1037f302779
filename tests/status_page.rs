//! The status page (`GET /`, `/status`) and `/status.json` on the proxy listener: exact
//! counts after a known sequence of hits, misses and upstream errors; hostile upstream text
//! escaped and secrets removed; refused where `/metrics` is; the history's ring wraps and
//! its memory stays under the stated bound.

mod common;

use std::time::{Duration, Instant};

use ::stowage::telemetry::history::{History, HOURS, LAST_ERRORS, SLOTS, TOP_PER_HOUR};
use ::stowage::telemetry::CacheStatus;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Polls `/status.json` until `check` holds (requests are recorded when their body ends,
/// a moment after the client has read it).
async fn status_until(
    client: &ProxyClient,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client.proxy_get("/status.json").await;
        assert_eq!(r.status, http::StatusCode::OK, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json();
        if check(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "status.json never showed {what}:\n{v:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `data-value` of the element whose `data-figure` is `path`.
fn figure<'a>(html: &'a str, path: &str) -> Option<&'a str> {
    let at = html.find(&format!("data-figure=\"{path}\" data-value=\""))?;
    let rest = &html[at..];
    let start = rest.find("data-value=\"")? + "data-value=\"".len();
    let end = rest[start..].find('"')?;
    Some(&rest[start..start + end])
}

fn sum_metric(text: &str, name: &str, label: &str, value: &str) -> f64 {
    let want = format!("{label}=\"{value}\"");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&want))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_sequence_shows_exact_counts_in_json_and_html() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let layer = pseudo_random(50_000, 1);
    let digest = quay.push_blob("team/app", layer.clone());
    let failing = quay.push_blob("team/app", pseudo_random(3000, 2));
    let hostile = quay.push_blob("team/app", pseudo_random(3000, 3));
    quay.push_image("team/app", "1", &[pseudo_random(1000, 4)]);
    quay.set_ratelimit(100, 90);
    quay.set_fault(&failing, Fault::Status(503));
    quay.set_fault(
        &hostile,
        Fault::RedirectTo(
            "https://storage.test:1/\"><script>alert(1)</script><img src=x onerror=alert(2)>?X-Amz-Signature=SECRETSIG".into(),
        ),
    );
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let registry = format!("quay.io:{}", quay.port());

    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let miss = s.blob(&digest).await;
    assert_eq!(miss.x_cache(), "miss");
    eventually("stored", || stowage.is_cached(&digest)).await;
    let mut cached_bytes = 0;
    for _ in 0..2 {
        let hit = s.blob(&digest).await;
        assert_eq!(hit.x_cache(), "hit");
        cached_bytes += hit.body.len() as u64;
    }
    let tag_miss = s.manifest("1").await;
    assert_eq!(tag_miss.x_cache(), "miss");
    let tag_hit = s.manifest("1").await;
    assert_eq!(tag_hit.x_cache(), "hit");
    cached_bytes += tag_hit.body.len() as u64;
    let r = s.blob(&failing).await;
    assert_eq!(r.status.as_u16(), 503);
    let r = s.blob(&hostile).await;
    assert!(r.status.is_server_error(), "{}", r.status);

    let v = status_until(&client, "3 hits, 2 misses... of 7 requests", |v| {
        let t = &v["traffic"]["since_start"];
        t["hits"] == 3 && t["misses"].as_u64() == Some(4)
    })
    .await;
    let metrics = client.proxy_get("/metrics").await.text();

    for window in ["since_start", "last_hour", "last_24h"] {
        let t = &v["traffic"][window];
        assert_eq!(t["hits"], 3, "{window}: {v:#}");
        // The layer, the tag, the 503 and the bad redirect.
        assert_eq!(t["misses"], 4, "{window}: {v:#}");
        assert_eq!(t["coalesced"], 0, "{window}");
        assert_eq!(t["stale"], 0, "{window}");
        assert_eq!(t["bytes_saved"].as_u64(), Some(cached_bytes), "{window}");
        assert_eq!(t["upstream_errors"], 2, "{window}: {v:#}");
        assert_eq!(t["hit_ratio"].as_f64(), Some(3.0 / 7.0), "{window}");
        // The same as the metrics, outcome by outcome.
        for (field, outcome) in [
            ("hits", "hit"),
            ("misses", "miss"),
            ("passed", "pass"),
            ("denied", "denied"),
        ] {
            assert_eq!(
                t[field].as_u64().unwrap() as f64,
                sum_metric(&metrics, "stowage_requests_total", "outcome", outcome),
                "{window}.{field} against /metrics:\n{metrics}"
            );
        }
        assert_eq!(
            t["bytes_from_upstream"].as_u64().unwrap() as f64,
            metric(
                &metrics,
                "stowage_served_bytes_total",
                &[("source", "upstream")]
            ),
        );
    }
    assert!(v["traffic"]["since_start"]["bytes_from_upstream"].as_u64() >= Some(50_000));

    let quay_row = v["registries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["registry"] == registry.as_str())
        .unwrap_or_else(|| panic!("no {registry} in {v:#}"))
        .clone();
    assert_eq!(quay_row["since_start"]["hits"], 3);
    assert_eq!(quay_row["since_start"]["misses"], 4);
    assert_eq!(
        quay_row["upstream_errors_last_hour"]["503"], 1,
        "{quay_row:#}"
    );
    assert_eq!(
        quay_row["upstream_errors_last_hour"]["connect"], 1,
        "{quay_row:#}"
    );
    assert_eq!(quay_row["upstream_errors_last_hour"]["429"], 0);
    assert_eq!(quay_row["quota_guard_engaged"], false);
    let rl = &quay_row["ratelimit"][0];
    assert_eq!(
        (rl["remaining"].as_u64(), rl["limit"].as_u64()),
        (Some(90), Some(100)),
        "{quay_row:#}"
    );
    assert_eq!(rl["headroom"].as_f64(), Some(0.9));

    let top = &v["top_repositories"]["by_bytes_served"][0];
    assert_eq!(top["repository"], "team/app");
    assert_eq!(top["registry"], registry.as_str());
    assert!(top["bytes_served"].as_u64().unwrap() >= 150_000, "{top:#}");
    let up = &v["top_repositories"]["by_upstream_bytes"][0];
    assert_eq!(up["repository"], "team/app");
    assert!(up["bytes_upstream"].as_u64().unwrap() >= 50_000, "{up:#}");

    let series = &v["history"];
    assert_eq!(series["requests_hit"].as_array().unwrap().len(), SLOTS);
    let total = |k: &str| -> u64 {
        series[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .sum()
    };
    assert_eq!(total("requests_hit"), 3);
    assert_eq!(total("requests_miss"), 4);
    assert_eq!(total("upstream_errors"), 2);
    assert_eq!(total("bytes_cache"), cached_bytes);

    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    let upstream: Vec<&serde_json::Value> =
        errors.iter().filter(|e| e["kind"] == "upstream").collect();
    assert_eq!(upstream.len(), 2);
    assert!(errors
        .iter()
        .all(|e| e["repository"] == "team/app" && e["registry"] == registry.as_str()));
    assert!(
        errors[1]["reason"].as_str().unwrap().contains("503"),
        "{errors:#?}"
    );
    assert!(
        errors[0]["reason"].as_str().unwrap().contains("<script>"),
        "{errors:#?}"
    );

    let json_text = client.proxy_get("/status.json").await.text();
    assert!(!json_text.contains("SECRETSIG"), "{json_text}");

    for path in ["/", "/status"] {
        let page = client.proxy_get(path).await;
        assert_eq!(page.status, http::StatusCode::OK);
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert!(page
            .header("content-security-policy")
            .unwrap()
            .contains("default-src 'none'"));
        let html = page.text();
        assert!(html.contains("<meta http-equiv=\"refresh\""), "{html}");
        assert!(html.contains("<svg"), "no chart");
        for (path, want) in [
            ("traffic.since_start.hits", "3"),
            ("traffic.since_start.misses", "4"),
            ("traffic.last_hour.hits", "3"),
            ("traffic.last_24h.upstream_errors", "2"),
            ("errors.length", "2"),
        ] {
            assert_eq!(figure(&html, path), Some(want), "{path} in {html}");
        }
        assert_eq!(
            figure(&html, "traffic.since_start.bytes_saved"),
            Some(cached_bytes.to_string().as_str())
        );
        assert_eq!(
            figure(&html, "top_repositories.by_bytes_served.0.repository"),
            Some("team/app")
        );
        assert!(
            html.contains("data-chart-total=\"requests.hit\" data-value=\"3\""),
            "{html}"
        );
        // Hostile upstream text is text, not markup; the signature never shows.
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("SECRETSIG"), "{html}");
        // Nothing loaded from elsewhere: an air-gapped browser renders all of it.
        assert!(!html.contains("src=\"http"), "{html}");
        assert!(!html.contains("<link"), "{html}");
    }
}

async fn raw_answer(addr: std::net::SocketAddr, request: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(request.as_bytes()).await;
    let mut resp = Vec::new();
    let _ = bounded("answer", tcp.read_to_end(&mut resp)).await;
    String::from_utf8_lossy(&resp).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_refused_where_metrics_is() {
    // Loopback outside the proxy's allow list: everything but /healthz is refused.
    let stowage = Stowage::builder()
        .proxy("allow = [\"10.0.0.0/8\"]")
        .toml("[mirror]\nlisten = \"127.0.0.1:0\"\n")
        .start()
        .await;
    for path in ["/metrics", "/", "/status", "/status.json"] {
        let text = raw_answer(
            stowage.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 403"), "{path}: {text}");
        assert!(
            !text.contains("hit_ratio") && !text.contains("Stowage status"),
            "{text}"
        );
    }
    // The mirror listener (loopback allowed) serves neither /metrics nor the page.
    let mirror = stowage.mirror_addr.expect("mirror listener");
    for path in ["/metrics", "/status", "/status.json"] {
        let text = raw_answer(
            mirror,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(!text.starts_with("HTTP/1.1 200"), "{path}: {text}");
        assert!(
            !text.contains("hit_ratio") && !text.contains("Stowage status"),
            "{path}: {text}"
        );
    }
}

/// The start of a minute.
const T0: u64 = 1_699_999_980_000;
const MINUTE: u64 = 60_000;

#[test]
fn the_ring_wraps_after_24_hours() {
    let h = History::new(T0, 8);
    h.request(T0, "quay.io", "old/one", CacheStatus::Hit, 10);
    h.upstream_error(T0, "quay.io", "old/one", "502", "upstream answered 502");
    let s = h.snapshot(T0);
    assert_eq!((s.last_24h.hits, s.last_hour.hits), (1, 1));
    assert_eq!(s.registries[0].upstream_errors_last_hour["502"], 1);

    // One hour on: out of the last hour, still in the last 24.
    let s = h.snapshot(T0 + 60 * MINUTE);
    assert_eq!((s.last_24h.hits, s.last_hour.hits), (1, 0));
    assert_eq!(s.registries[0].upstream_errors_last_hour["502"], 0);
    assert_eq!(s.top_by_bytes_served[0].repository, "old/one");

    // 1440 minutes on, a request lands in the same slot: the old minute is gone.
    let later = T0 + SLOTS as u64 * MINUTE;
    h.request(later, "quay.io", "new/one", CacheStatus::Miss, 7);
    let s = h.snapshot(later);
    assert_eq!(
        s.last_24h.hits, 0,
        "the wrapped slot still holds the old minute"
    );
    assert_eq!(s.last_24h.misses, 1);
    assert_eq!(s.series.requests_hit.iter().sum::<u64>(), 0);
    assert_eq!(*s.series.requests_miss.last().unwrap(), 1);
    assert_eq!(s.since_start.hits, 1, "since start keeps everything");
    assert_eq!(s.since_start.misses, 1);
    assert_eq!(
        s.series.first_minute_ms,
        later / MINUTE * MINUTE - (SLOTS as u64 - 1) * MINUTE
    );
    let repos: Vec<&str> = s
        .top_by_bytes_served
        .iter()
        .map(|r| r.repository.as_str())
        .collect();
    assert_eq!(
        repos,
        ["new/one"],
        "a repository from 24 h ago is still on top"
    );

    // One request a minute for 50 hours: every point of the last 24 h is exactly 1.
    let h = History::new(T0, 8);
    for m in 0..3000 {
        h.request(
            T0 + m * MINUTE + 30_000,
            "quay.io",
            "a/b",
            CacheStatus::Hit,
            1,
        );
    }
    let s = h.snapshot(T0 + 2999 * MINUTE + 59_000);
    assert_eq!(s.series.requests_hit.len(), SLOTS);
    let off: Vec<usize> = (0..SLOTS)
        .filter(|&i| s.series.requests_hit[i] != 1)
        .collect();
    assert!(off.is_empty(), "points not 1: {off:?}");
    assert_eq!(s.last_24h.hits, SLOTS as u64);
    assert_eq!(s.last_hour.hits, 60);
    assert_eq!(s.since_start.hits, 3000);
    // The top tables go by clock hour: the current one and the 23 before it.
    let top = s.top_by_bytes_served[0].bytes_served;
    assert!((23 * 60 + 1..=SLOTS as u64).contains(&top), "{top}");
}

#[test]
fn memory_stays_under_the_stated_bound() {
    // The figure docs/status.md states, for the 64 registry labels the server tracks.
    let bound = History::memory_bound(::stowage::telemetry::metrics::HISTORY_REGISTRIES);
    assert!(
        bound < 3 << 20,
        "bound {bound} is more than the 3 MiB the docs state"
    );

    let h = History::new(T0, ::stowage::telemetry::metrics::HISTORY_REGISTRIES);
    let long = "x".repeat(5000);
    // Two days of hostile traffic: a new registry label, repository and error every request.
    for i in 0..40_000u64 {
        let now = T0 + i * 5_000;
        let registry = format!("r{}.example:{}", i % 500, 1000 + i);
        let repo = format!("{long}/{i}");
        h.request(now, &registry, &repo, CacheStatus::Miss, 100);
        h.upstream_error(now, &registry, &repo, "connect", &format!("{long} {i}"));
    }
    let used = h.approx_bytes();
    eprintln!("history: {used} bytes held after the flood, bound {bound}");
    assert!(used <= bound, "{used} bytes held, bound {bound}");
    let s = h.snapshot(T0 + 40_000 * 5_000);
    assert_eq!(s.errors.len(), LAST_ERRORS);
    assert!(s.registries.len() <= ::stowage::telemetry::metrics::HISTORY_REGISTRIES + 1);
    assert!(
        s.unattributed.1 > 0,
        "repositories past the per-hour bound are summed"
    );
    // Every hour kept its full table.
    assert!(s.top_by_bytes_served.len() <= 10);
    let _ = (TOP_PER_HOUR, HOURS);
}

async fn blob_head_only(s: &Session, digest: &str) -> http::Response<hyper::body::Incoming> {
    let auth = format!("Bearer {}", s.token);
    s.tunnel
        .send(
            http::Method::GET,
            &s.blob_path(digest),
            &[("authorization", &auth)],
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_in_flight_shows_its_bytes_total_and_readers() {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let data = pseudo_random(2 << 20, 40);
    let digest = quay.push_blob("team/app", data.clone());
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let s1 = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let s2 = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    let gate = quay.hold_blob_bodies();
    let leader = bounded("leader head", blob_head_only(&s1, &digest)).await;
    assert_eq!(leader.headers().get("x-cache").unwrap(), "miss");
    let follower = bounded("follower head", blob_head_only(&s2, &digest)).await;
    assert_eq!(follower.headers().get("x-cache").unwrap(), "coalesced");

    let v = status_until(
        &client,
        "one fill with two readers and its first bytes",
        |v| {
            let f = &v["fills"][0];
            f["readers"] == 2 && f["bytes_done"].as_u64() > Some(0)
        },
    )
    .await;
    let fills = v["fills"].as_array().unwrap();
    assert_eq!(fills.len(), 1, "{v:#}");
    let f = &fills[0];
    assert_eq!(f["digest"], digest.as_str());
    assert_eq!(f["repository"], "team/app");
    assert_eq!(f["registry"], format!("quay.io:{}", quay.port()).as_str());
    assert_eq!(f["total"].as_u64(), Some(data.len() as u64));
    assert!(
        f["bytes_done"].as_u64().unwrap() < data.len() as u64,
        "{f:#}"
    );
    assert!(f["bytes_per_second"].as_f64().unwrap() > 0.0);
    let html = client.proxy_get("/").await.text();
    assert_eq!(figure(&html, "fills.length"), Some("1"));
    assert_eq!(figure(&html, "fills.0.readers"), Some("2"));

    gate.open();
    let (a, b) = bounded(
        "both bodies",
        futures_util::future::join(
            client::read_response(leader),
            client::read_response(follower),
        ),
    )
    .await;
    assert_eq!(sha256_digest(&a.body), digest);
    assert_eq!(sha256_digest(&b.body), digest);
    let v = status_until(&client, "no fill in flight", |v| {
        v["fills"].as_array().is_some_and(|f| f.is_empty())
    })
    .await;
    assert_eq!(v["traffic"]["since_start"]["coalesced"], 1);
}
