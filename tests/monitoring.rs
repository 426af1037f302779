//! The Grafana dashboard and the Prometheus alert rules in `examples/` speak about metrics
//! that `/metrics` really exports, and every exported metric is documented in the README.
//! (The rules' own logic is unit-tested by `promtool test rules`, run from tests/run.sh.)

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;

fn repo(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every `stowage_*` / `process_*` metric name in `text` (PromQL, a series selector).
fn metric_names(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        let starts = (i == 0 || !word(b[i - 1]))
            && (text[i..].starts_with("stowage_") || text[i..].starts_with("process_"));
        if starts {
            let end = (i..b.len()).find(|&j| !word(b[j])).unwrap_or(b.len());
            out.insert(text[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// The sample names a scrape can contain, from its `# TYPE` lines and its samples, and the
/// name each family is documented under.
fn exported(scrape: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut samples = BTreeSet::new();
    let mut documented = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["bucket", "sum", "count"]
                    .iter()
                    .map(|s| format!("{name}_{s}"))
                    .collect(),
                "info" => vec![format!("{name}_info")],
                _ => vec![name.to_owned()],
            };
            documented.insert(match kind {
                "histogram" | "gauge" | "unknown" => name.to_owned(),
                _ => names[0].clone(),
            });
            samples.extend(names);
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            samples.insert(name.to_owned());
        }
    }
    (samples, documented)
}

/// The `expr` of every rule in a rules file, and the series of every unit test's input.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let v: serde_norway::Value = serde_norway::from_str(yaml).expect("rules YAML");
    let mut out = Vec::new();
    for g in v["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            out.push(r["expr"].as_str().expect("expr").to_owned());
        }
    }
    out
}

fn test_series(yaml: &str) -> Vec<String> {
    let v: serde_norway::Value = serde_norway::from_str(yaml).expect("rule tests YAML");
    let mut out = Vec::new();
    for t in v["tests"].as_sequence().expect("tests") {
        for s in t["input_series"].as_sequence().expect("input_series") {
            out.push(s["series"].as_str().expect("series").to_owned());
        }
    }
    out
}

/// Every `expr` and templating `query` in the dashboard JSON.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// A scrape after a miss and a hit, so that every labelled family has samples.
async fn scrape() -> String {
    let ca = TestCa::new();
    let quay = FakeRegistry::builder(&ca).host("quay.io").build().await;
    let digest = quay.push_blob("team/app", pseudo_random(50_000, 7));
    quay.push_image("team/app", "1", &[pseudo_random(1000, 8)]);
    quay.set_ratelimit(100, 90);
    let stowage = Stowage::start(&ca).await;
    let client = stowage.client();
    let s = Session::login(&client, "quay.io", quay.port(), "team/app", Alpn::Http11).await;
    assert_eq!(s.blob(&digest).await.x_cache(), "miss");
    eventually("stored", || stowage.is_cached(&digest)).await;
    assert_eq!(s.blob(&digest).await.x_cache(), "hit");
    assert_eq!(s.manifest("1").await.status, http::StatusCode::OK);
    let mut text = String::new();
    for _ in 0..250 {
        text = client.proxy_get("/metrics").await.text();
        if metric(&text, "stowage_request_duration_seconds_count", &[]) >= 2.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_exported_metrics_and_all_are_documented() {
    let text = scrape().await;
    let (samples, documented) = exported(&text);
    assert!(samples.contains("stowage_requests_total"), "{text}");

    let dashboard: serde_json::Value =
        serde_json::from_str(&repo("examples/grafana/stowage-dashboard.json")).unwrap();
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() > 20, "{queries:?}");
    let rules = rule_exprs(&repo("examples/prometheus/stowage-alerts.yml"));
    assert!(rules.len() >= 6, "{rules:?}");
    let series = test_series(&repo("examples/prometheus/stowage-alerts.test.yml"));

    let mut unknown = Vec::new();
    for (what, texts) in [
        ("examples/grafana/stowage-dashboard.json", &queries),
        ("examples/prometheus/stowage-alerts.yml", &rules),
        ("examples/prometheus/stowage-alerts.test.yml", &series),
    ] {
        let used: BTreeSet<String> = texts.iter().flat_map(|t| metric_names(t)).collect();
        assert!(!used.is_empty(), "{what} names no metric");
        for name in used.difference(&samples) {
            unknown.push(format!("{what}: {name}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics used but not exported by /metrics: {unknown:#?}\nexported: {samples:#?}"
    );

    // The issue's list of what the dashboard shows, each by a metric it must query.
    let used: BTreeSet<String> = queries.iter().flat_map(|t| metric_names(t)).collect();
    for must in [
        "stowage_requests_total",
        "stowage_served_bytes_total",
        "stowage_upstream_errors_total",
        "stowage_upstream_ratelimit_remaining",
        "stowage_quota_guard_engaged",
        "stowage_cache_size_bytes",
        "stowage_cache_max_size_bytes",
        "stowage_fills_in_flight",
        "stowage_request_duration_seconds_bucket",
    ] {
        assert!(used.contains(must), "the dashboard does not show {must}");
    }

    let readme = repo("README.md");
    let undocumented: Vec<&String> = documented
        .iter()
        .filter(|n| !readme.contains(&format!("`{n}")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in the README: {undocumented:?}"
    );
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        r#"sum(rate(stowage_requests_total{x="stowage_not"}[5m])) / on (instance) process_open_fds and my_stowage_x"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["process_open_fds", "stowage_not", "stowage_requests_total"]
    );
}
