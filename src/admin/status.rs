//! The status page: `GET /` and `/status` (HTML) and `/status.json` on the proxy listener.
//!
//! [`gather`] copies the live state (cache, fills, quota windows) and the in-process history
//! (`telemetry::history`) into one [`Status`]; `/status.json` is that value, and [`html`]
//! renders the same value as a page with no script and no external asset: inline CSS, inline
//! SVG charts, and `<meta http-equiv="refresh">`. Every figure on the page carries
//! `data-figure="<path in status.json>"` and `data-value`, so a test (or a scraper) reads
//! the page without parsing its prose.
//!
//! Everything that came from a request or an upstream (repository names, registry names,
//! error texts) goes through [`escape`]; error texts were stripped of secrets when recorded.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::human_bytes;
use crate::cache::fill::FillView;
use crate::registry_api::quota::Headroom;
use crate::registry_api::RegistryApi;
use crate::telemetry::history::{ErrorEntry, RepoBytes, Series, Window};
use crate::telemetry::metrics::{COMMIT, VERSION};

/// Seconds between the page's own reloads.
pub const REFRESH_SECONDS: u64 = 10;
/// Fills listed at most.
pub const FILLS_LISTED: usize = 50;

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub commit: &'static str,
    /// When this was taken (ms since the epoch).
    pub now_ms: u64,
    /// When the history started (process start).
    pub started_ms: u64,
    pub refresh_seconds: u64,
    pub traffic: Traffic,
    pub registries: Vec<RegistryStatus>,
    pub cache: CacheState,
    pub connections: Connections,
    pub fills: Vec<FillView>,
    pub top_repositories: TopRepositories,
    /// The last errors, newest first (at most `telemetry::history::LAST_ERRORS`).
    pub errors: Vec<ErrorEntry>,
    pub history: Series,
}

#[derive(Clone, Debug, Serialize)]
pub struct Traffic {
    pub since_start: Window,
    pub last_hour: Window,
    pub last_24h: Window,
}

#[derive(Clone, Debug, Serialize)]
pub struct RegistryStatus {
    /// The registry as metric labels name it (`other` for every unconfigured host).
    pub registry: String,
    pub since_start: Window,
    pub upstream_errors_last_hour: BTreeMap<&'static str, u64>,
    /// Whether the quota guard is engaged for some account of this registry.
    pub quota_guard_engaged: bool,
    /// The last `ratelimit-*` answer per account, lowest headroom first.
    pub ratelimit: Vec<Headroom>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CacheState {
    pub objects: u64,
    pub bytes: u64,
    pub max_size: u64,
    pub pinned_bytes: u64,
    /// Free space on the cache's file system; `null` when it cannot be read.
    pub disk_free: Option<u64>,
    pub min_free: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
    /// `null`, `disk_full` or `write_error`.
    pub caching_paused: Option<&'static str>,
    /// Why, in words; `null` when caching is on.
    pub caching_paused_why: Option<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Connections {
    pub open: u64,
    pub max: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TopRepositories {
    /// Over the last 24 hours, by bytes sent to clients (cache and upstream).
    pub by_bytes_served: Vec<RepoBytes>,
    /// Over the last 24 hours, by bytes fetched from upstream for clients.
    pub by_upstream_bytes: Vec<RepoBytes>,
    /// Bytes of repositories past the per-hour table bound (served, upstream).
    pub unattributed: (u64, u64),
}

/// Takes the status now. Blocking (the pinned share reads the metadata store): call it
/// from the blocking pool.
pub fn gather(
    api: &RegistryApi,
    registries: &[crate::oci::Registry],
    connections: Connections,
    now_ms: u64,
) -> Status {
    let m = &api.metrics;
    let cache = &api.cache;
    let snap = m.history.snapshot(now_ms);
    let stats = super::stats(&cache.store, cache.limits.max_size);
    let paused = cache.paused();
    let mut figures: BTreeMap<String, crate::telemetry::history::RegistryFigures> = snap
        .registries
        .into_iter()
        .map(|f| (f.registry.clone(), f))
        .collect();
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in registries {
        let label = m.registry_label(r);
        if !seen.insert(label.clone()) {
            continue;
        }
        let f = figures.remove(&label);
        rows.push(RegistryStatus {
            since_start: f
                .as_ref()
                .map(|f| f.since_start.clone())
                .unwrap_or_default(),
            upstream_errors_last_hour: f
                .map(|f| f.upstream_errors_last_hour)
                .unwrap_or_else(zero_errors),
            quota_guard_engaged: api.quota.engaged_anywhere(r),
            ratelimit: api.quota.headroom(r),
            registry: label,
        });
    }
    // Labels seen in traffic but not configured (`other`, other ports of a known host).
    for (label, f) in figures {
        let parsed: Option<crate::oci::Registry> = label.parse().ok();
        rows.push(RegistryStatus {
            registry: label,
            since_start: f.since_start,
            upstream_errors_last_hour: f.upstream_errors_last_hour,
            quota_guard_engaged: parsed
                .as_ref()
                .is_some_and(|r| api.quota.engaged_anywhere(r)),
            ratelimit: parsed.map(|r| api.quota.headroom(&r)).unwrap_or_default(),
        });
    }
    Status {
        version: VERSION,
        commit: COMMIT,
        now_ms,
        started_ms: snap.started_ms,
        refresh_seconds: REFRESH_SECONDS,
        traffic: Traffic {
            since_start: snap.since_start,
            last_hour: snap.last_hour,
            last_24h: snap.last_24h,
        },
        registries: rows,
        cache: CacheState {
            objects: stats.objects,
            bytes: stats.bytes,
            max_size: stats.max_size,
            pinned_bytes: stats.pinned_bytes,
            disk_free: cache.store.free_space(),
            min_free: cache.limits.min_free,
            evictions: m.evictions.get(),
            evicted_bytes: m.evicted_bytes.get(),
            caching_paused: paused,
            caching_paused_why: paused.map(|p| match p {
                "disk_full" => "free disk space is below [cache] min_free",
                _ => "a cache write failed; new objects pass through for 30 s",
            }),
        },
        connections,
        fills: cache.fills.snapshot(FILLS_LISTED),
        top_repositories: TopRepositories {
            by_bytes_served: snap.top_by_bytes_served,
            by_upstream_bytes: snap.top_by_upstream_bytes,
            unattributed: snap.unattributed,
        },
        errors: snap.errors,
        history: snap.series,
    }
}

fn zero_errors() -> BTreeMap<&'static str, u64> {
    (0..crate::telemetry::history::ERROR_KINDS)
        .map(|i| (crate::telemetry::history::error_kind_name(i), 0))
        .collect()
}

/// `s` safe as HTML text and as a quoted attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{:.1}%", r * 100.0))
        .unwrap_or_else(|| "–".into())
}

fn time(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, mo, d) = crate::telemetry::log_format::civil_from_days(days);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A figure: its text, and its value and `status.json` path for machines.
fn fig(out: &mut String, tag: &str, path: &str, value: impl std::fmt::Display, text: &str) {
    let _ = write!(
        out,
        r#"<{tag} data-figure="{}" data-value="{}">{}</{tag}>"#,
        escape(path),
        escape(&value.to_string()),
        escape(text)
    );
}

fn window_row(out: &mut String, label: &str, path: &str, w: &Window) {
    let _ = write!(out, "<tr><th>{}</th>", escape(label));
    let cell = |out: &mut String, key: &str, v: u64, text: String| {
        fig(out, "td", &format!("{path}.{key}"), v, &text)
    };
    let ratio_value = w
        .hit_ratio
        .map(|r| format!("{r}"))
        .unwrap_or_else(|| "null".into());
    fig(
        out,
        "td",
        &format!("{path}.hit_ratio"),
        ratio_value,
        &ratio(w.hit_ratio),
    );
    cell(out, "hits", w.hits, w.hits.to_string());
    cell(out, "coalesced", w.coalesced, w.coalesced.to_string());
    cell(out, "stale", w.stale, w.stale.to_string());
    cell(out, "misses", w.misses, w.misses.to_string());
    cell(out, "passed", w.passed, w.passed.to_string());
    cell(out, "denied", w.denied, w.denied.to_string());
    cell(
        out,
        "bytes_saved",
        w.bytes_saved,
        human_bytes(w.bytes_saved),
    );
    cell(
        out,
        "bytes_from_upstream",
        w.bytes_from_upstream,
        human_bytes(w.bytes_from_upstream),
    );
    cell(
        out,
        "upstream_errors",
        w.upstream_errors,
        w.upstream_errors.to_string(),
    );
    out.push_str("</tr>\n");
}

const WINDOW_HEAD: &str = "<tr><th></th><th>hit ratio</th><th>hits</th><th>coalesced</th><th>stale</th><th>misses</th><th>passed</th><th>denied</th><th>bytes saved</th><th>bytes from upstream</th><th>upstream errors</th></tr>\n";

/// One line chart over the history: `series` as (name, colour, points).
fn chart(out: &mut String, id: &str, title: &str, series: &[(&str, &str, &[u64])], bytes: bool) {
    const W: f64 = 1000.0;
    const H: f64 = 160.0;
    let max = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let _ = write!(
        out,
        r#"<figure class="chart"><figcaption>{}</figcaption><svg id="chart-{id}" data-chart="{id}" viewBox="0 0 {W} {}" width="100%" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"#,
        escape(title),
        H + 20.0,
        escape(title)
    );
    let _ = write!(
        out,
        r##"<rect x="0" y="0" width="{W}" height="{H}" fill="#fafafa" stroke="#ccc"/>"##
    );
    for (name, colour, points) in series {
        let n = points.len().max(2) as f64;
        let mut pts = String::with_capacity(points.len() * 12);
        for (i, v) in points.iter().enumerate() {
            let x = i as f64 * W / (n - 1.0);
            let y = H - (*v as f64) * (H - 4.0) / max as f64;
            let _ = write!(pts, "{x:.1},{y:.1} ");
        }
        let total: u64 = points.iter().sum();
        let _ = write!(
            out,
            r#"<polyline data-series="{}" data-total="{total}" fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            escape(name),
            pts.trim_end()
        );
    }
    let max_text = if bytes {
        human_bytes(max)
    } else {
        max.to_string()
    };
    let _ = write!(
        out,
        r##"<text x="4" y="14" font-size="12" fill="#555">max {} / min</text><text x="0" y="{}" font-size="12" fill="#555">−24 h</text><text x="{}" y="{}" font-size="12" fill="#555" text-anchor="end">now</text></svg><div class="legend">"##,
        escape(&max_text),
        H + 16.0,
        W,
        H + 16.0
    );
    for (name, colour, points) in series {
        let total: u64 = points.iter().sum();
        let total_text = if bytes {
            human_bytes(total)
        } else {
            total.to_string()
        };
        let _ = write!(
            out,
            r#"<span><i style="background:{colour}"></i>{} <b data-chart-total="{id}.{}" data-value="{total}">{}</b></span> "#,
            escape(name),
            escape(name),
            escape(&total_text)
        );
    }
    out.push_str("</div></figure>\n");
}

/// The page.
pub fn html(s: &Status) -> String {
    let mut o = String::with_capacity(64 * 1024);
    let _ = write!(
        o,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Stowage status</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}}
h1{{font-size:1.4em;margin:0 0 .2em}} h2{{font-size:1.1em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}}
table{{border-collapse:collapse;margin:.3em 0}} th,td{{padding:.15em .6em;text-align:right;border-bottom:1px solid #eee}}
th:first-child,td.l{{text-align:left}} .muted{{color:#777}} .bad{{color:#b00;font-weight:bold}} .ok{{color:#070}}
.bar{{background:#eee;width:400px;height:14px;position:relative;display:inline-block;vertical-align:middle}}
.bar span{{position:absolute;top:0;bottom:0;left:0;background:#4a7}} .bar span.pin{{background:#27a}}
figure.chart{{margin:.5em 0 1em}} .legend span{{margin-right:1.2em}} .legend i{{display:inline-block;width:10px;height:10px;margin-right:4px}}
td.reason{{text-align:left;max-width:600px;word-break:break-all}}
</style></head><body>
<h1>Stowage status</h1>
<p class="muted">version <span id="version">{}</span> ({}) · taken <span id="now" data-value="{}">{}</span> · up since {} · refreshes every {} s · <a href="/status.json">status.json</a> · <a href="/metrics">metrics</a></p>
"#,
        s.refresh_seconds,
        escape(s.version),
        escape(s.commit),
        s.now_ms,
        time(s.now_ms),
        time(s.started_ms),
        s.refresh_seconds
    );

    o.push_str("<h2>Hit ratio and bytes saved</h2>\n<table id=\"traffic\">");
    o.push_str(WINDOW_HEAD);
    window_row(
        &mut o,
        "since start",
        "traffic.since_start",
        &s.traffic.since_start,
    );
    window_row(
        &mut o,
        "last hour",
        "traffic.last_hour",
        &s.traffic.last_hour,
    );
    window_row(&mut o, "last 24 h", "traffic.last_24h", &s.traffic.last_24h);
    o.push_str("</table>\n<h3>Per registry, since start</h3>\n<table id=\"registries\">");
    o.push_str(WINDOW_HEAD);
    for (i, r) in s.registries.iter().enumerate() {
        window_row(
            &mut o,
            &r.registry,
            &format!("registries.{i}.since_start"),
            &r.since_start,
        );
    }
    o.push_str("</table>\n");

    // The cache.
    let c = &s.cache;
    let pct = |n: u64, of: u64| {
        if of == 0 {
            0.0
        } else {
            (n as f64 * 100.0 / of as f64).min(100.0)
        }
    };
    o.push_str("<h2>Cache</h2>\n<table id=\"cache\">");
    let _ = write!(
        o,
        r#"<tr><th>size</th><td class="l"><span class="bar"><span style="width:{:.1}%"></span><span class="pin" style="width:{:.1}%"></span></span> "#,
        pct(c.bytes, c.max_size),
        pct(c.pinned_bytes, c.max_size)
    );
    fig(
        &mut o,
        "span",
        "cache.bytes",
        c.bytes,
        &human_bytes(c.bytes),
    );
    o.push_str(" of ");
    fig(
        &mut o,
        "span",
        "cache.max_size",
        c.max_size,
        &human_bytes(c.max_size),
    );
    let _ = write!(o, " ({:.1}%), pinned ", pct(c.bytes, c.max_size));
    fig(
        &mut o,
        "span",
        "cache.pinned_bytes",
        c.pinned_bytes,
        &human_bytes(c.pinned_bytes),
    );
    o.push_str("</td></tr>\n<tr><th>free disk</th><td class=\"l\">");
    match c.disk_free {
        Some(f) => {
            let low = f < c.min_free;
            let _ = write!(o, "<span class=\"{}\">", if low { "bad" } else { "ok" });
            fig(&mut o, "span", "cache.disk_free", f, &human_bytes(f));
            o.push_str("</span>");
        }
        None => fig(&mut o, "span", "cache.disk_free", "null", "unknown"),
    }
    o.push_str(" (caching pauses below ");
    fig(
        &mut o,
        "span",
        "cache.min_free",
        c.min_free,
        &human_bytes(c.min_free),
    );
    o.push_str(")</td></tr>\n<tr><th>objects</th><td class=\"l\">");
    fig(
        &mut o,
        "span",
        "cache.objects",
        c.objects,
        &c.objects.to_string(),
    );
    o.push_str("</td>");
    o.push_str("</tr>\n<tr><th>evictions</th><td class=\"l\">");
    fig(
        &mut o,
        "span",
        "cache.evictions",
        c.evictions,
        &c.evictions.to_string(),
    );
    o.push_str(" objects, ");
    fig(
        &mut o,
        "span",
        "cache.evicted_bytes",
        c.evicted_bytes,
        &human_bytes(c.evicted_bytes),
    );
    o.push_str("</td></tr>\n<tr><th>caching</th><td class=\"l\">");
    match (c.caching_paused, c.caching_paused_why) {
        (Some(p), why) => {
            o.push_str("<span class=\"bad\">");
            fig(&mut o, "span", "cache.caching_paused", p, "paused");
            let _ = write!(o, "</span>: {} ({})", escape(why.unwrap_or("")), escape(p));
        }
        (None, _) => fig(&mut o, "span", "cache.caching_paused", "null", "on"),
    }
    o.push_str("</td></tr>\n<tr><th>connections</th><td class=\"l\">");
    fig(
        &mut o,
        "span",
        "connections.open",
        s.connections.open,
        &s.connections.open.to_string(),
    );
    o.push_str(" open of ");
    fig(
        &mut o,
        "span",
        "connections.max",
        s.connections.max,
        &s.connections.max.to_string(),
    );
    o.push_str("</td></tr></table>\n");

    // Fills.
    let _ = writeln!(
        o,
        "<h2>Fills in flight: <span data-figure=\"fills.length\" data-value=\"{0}\">{0}</span></h2>",
        s.fills.len()
    );
    if !s.fills.is_empty() {
        o.push_str("<table id=\"fills\"><tr><th>registry / repository</th><th>blob</th><th>done</th><th>of</th><th>rate</th><th>readers</th><th>running</th></tr>\n");
        for (i, f) in s.fills.iter().enumerate() {
            let _ = write!(
                o,
                "<tr><td class=\"l\">{} / {}</td><td class=\"l\" title=\"{}\">{}</td>",
                escape(&f.registry),
                escape(&f.repository),
                escape(&f.digest),
                escape(f.digest.get(..19).unwrap_or(&f.digest))
            );
            fig(
                &mut o,
                "td",
                &format!("fills.{i}.bytes_done"),
                f.bytes_done,
                &human_bytes(f.bytes_done),
            );
            let _ = write!(
                o,
                "<td>{}</td><td>{}/s</td>",
                f.total.map(human_bytes).unwrap_or_else(|| "?".into()),
                human_bytes(f.bytes_per_second as u64)
            );
            fig(
                &mut o,
                "td",
                &format!("fills.{i}.readers"),
                f.readers,
                &f.readers.to_string(),
            );
            let _ = writeln!(o, "<td>{:.0} s</td></tr>", f.elapsed_seconds);
        }
        o.push_str("</table>\n");
    }

    // Upstream health.
    o.push_str("<h2>Upstream health</h2>\n<table id=\"upstream\"><tr><th>registry</th><th>errors, last hour</th><th>rate limit left (per account)</th><th>quota guard</th></tr>\n");
    for (i, r) in s.registries.iter().enumerate() {
        let _ = write!(
            o,
            "<tr><td class=\"l\">{}</td><td class=\"l\">",
            escape(&r.registry)
        );
        let errors: Vec<(&&str, &u64)> = r
            .upstream_errors_last_hour
            .iter()
            .filter(|(_, n)| **n > 0)
            .collect();
        if errors.is_empty() {
            o.push_str("<span class=\"ok\">none</span>");
        }
        for (kind, n) in errors {
            let _ = write!(o, "{}: ", escape(kind));
            fig(
                &mut o,
                "b",
                &format!("registries.{i}.upstream_errors_last_hour.{kind}"),
                n,
                &n.to_string(),
            );
            o.push(' ');
        }
        o.push_str("</td><td class=\"l\">");
        if r.ratelimit.is_empty() {
            o.push_str("<span class=\"muted\">not stated</span>");
        }
        for (j, h) in r.ratelimit.iter().enumerate() {
            let low = h.headroom.is_some_and(|x| x < 0.1);
            let _ = write!(
                o,
                "<div class=\"{}\">{}: ",
                if low { "bad" } else { "" },
                escape(&h.account)
            );
            fig(
                &mut o,
                "span",
                &format!("registries.{i}.ratelimit.{j}.remaining"),
                h.remaining,
                &h.remaining.to_string(),
            );
            let _ = write!(o, " of {} ({})</div>", h.limit, ratio(h.headroom));
        }
        o.push_str("</td>");
        fig(
            &mut o,
            "td",
            &format!("registries.{i}.quota_guard_engaged"),
            r.quota_guard_engaged,
            if r.quota_guard_engaged {
                "engaged"
            } else {
                "off"
            },
        );
        o.push_str("</tr>\n");
    }
    o.push_str("</table>\n");

    // Top repositories.
    for (id, title, path, rows) in [
        (
            "top-served",
            "Top repositories by bytes served (24 h)",
            "top_repositories.by_bytes_served",
            &s.top_repositories.by_bytes_served,
        ),
        (
            "top-upstream",
            "Top repositories by upstream bytes (24 h)",
            "top_repositories.by_upstream_bytes",
            &s.top_repositories.by_upstream_bytes,
        ),
    ] {
        let _ = write!(
            o,
            "<h2>{}</h2>\n<table id=\"{id}\"><tr><th>registry</th><th>repository</th><th>served</th><th>from upstream</th></tr>\n",
            escape(title)
        );
        for (i, r) in rows.iter().enumerate() {
            let _ = write!(
                o,
                "<tr><td class=\"l\">{}</td><td class=\"l\" data-figure=\"{path}.{i}.repository\" data-value=\"{}\">{}</td>",
                escape(&r.registry),
                escape(&r.repository),
                escape(&r.repository)
            );
            fig(
                &mut o,
                "td",
                &format!("{path}.{i}.bytes_served"),
                r.bytes_served,
                &human_bytes(r.bytes_served),
            );
            fig(
                &mut o,
                "td",
                &format!("{path}.{i}.bytes_upstream"),
                r.bytes_upstream,
                &human_bytes(r.bytes_upstream),
            );
            o.push_str("</tr>\n");
        }
        if rows.is_empty() {
            o.push_str("<tr><td class=\"l muted\" colspan=\"4\">nothing yet</td></tr>\n");
        }
        o.push_str("</table>\n");
    }

    // Charts.
    let h = &s.history;
    o.push_str("<h2>Last 24 hours, per minute</h2>\n");
    chart(
        &mut o,
        "requests",
        "Requests by outcome",
        &[
            ("hit", "#2a7", &h.requests_hit),
            ("coalesced", "#7c4", &h.requests_coalesced),
            ("stale", "#aa3", &h.requests_stale),
            ("miss", "#d62", &h.requests_miss),
            ("pass", "#888", &h.requests_pass),
            ("denied", "#a3a", &h.requests_denied),
        ],
        false,
    );
    chart(
        &mut o,
        "bytes",
        "Bytes served: from the cache and from upstream",
        &[
            ("cache", "#2a7", &h.bytes_cache),
            ("upstream", "#d62", &h.bytes_upstream),
        ],
        true,
    );
    chart(
        &mut o,
        "errors",
        "Upstream errors",
        &[("errors", "#b00", &h.upstream_errors)],
        false,
    );

    // Errors.
    let _ = write!(
        o,
        "<h2>Last errors: <span data-figure=\"errors.length\" data-value=\"{0}\">{0}</span></h2>\n<table id=\"errors\"><tr><th>time</th><th>kind</th><th>registry</th><th>repository</th><th>times</th><th>reason</th></tr>\n",
        s.errors.len()
    );
    for (i, e) in s.errors.iter().enumerate() {
        let _ = write!(
            o,
            "<tr><td class=\"l\">{}</td><td class=\"l\" data-figure=\"errors.{i}.kind\" data-value=\"{}\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td>",
            time(e.time_ms),
            escape(e.kind),
            escape(e.kind),
            escape(&e.registry),
            escape(&e.repository)
        );
        fig(
            &mut o,
            "td",
            &format!("errors.{i}.count"),
            e.count,
            &e.count.to_string(),
        );
        let _ = writeln!(
            o,
            "<td class=\"reason\" data-figure=\"errors.{i}.reason\">{}</td></tr>",
            escape(&e.reason)
        );
    }
    o.push_str("</table>\n</body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert('x')</script> & "q""#),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(1_700_000_000_000), "2023-11-14 22:13:20 UTC");
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }
}
