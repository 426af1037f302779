//! Prometheus metrics, served at `GET /metrics` on the proxy listener.
//!
//! Counters are bumped where things happen (the access-log body, fills, the CA, the
//! evictor); gauges that mirror live state (cache size, fills in flight) are read when a
//! scrape renders, so they can never drift.
//!
//! A `registry` label names only configured registries and their auth hosts; any other host
//! a request names (absolute-form URLs, `ns=` with `any_registry`, storage hosts) is
//! `other`, so clients cannot create series by asking for new names. Every other label has
//! a fixed, small set of values (`code` folds rare statuses into their class), and the
//! error, refusal and quota series exist at zero from the start ([`Metrics::start_at_zero`]),
//! so `rate()` and alerts see their first increase.
//!
//! Names follow the Prometheus conventions: `stowage_` prefix, base units in the name
//! (`_seconds`, `_bytes`), counters end in `_total`; the process metrics use the standard
//! `process_*` names.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use super::history::History;
use super::process;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub registry: String,
    pub kind: &'static str,
    pub outcome: &'static str,
    /// The response status: one of [`STATUS_CODES`], else its class (`2xx`..`5xx`).
    pub code: &'static str,
}

/// Statuses a registry proxy answers often enough to be worth a series of their own;
/// every other status is counted under its class, so the label has at most 17 values.
pub const STATUS_CODES: &[u16] = &[200, 206, 304, 307, 401, 403, 404, 429, 500, 502, 503, 504];

/// The `code` label of `status`.
pub fn code_label(status: u16) -> &'static str {
    const NAMES: [&str; 12] = [
        "200", "206", "304", "307", "401", "403", "404", "429", "500", "502", "503", "504",
    ];
    const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    match STATUS_CODES.iter().position(|&c| c == status) {
        Some(i) => NAMES[i],
        None => CLASSES[usize::from((status / 100).clamp(1, 5)) - 1],
    }
}

/// Labels of the latency histograms: no registry, so a histogram's buckets are multiplied
/// by (kind x outcome) only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub kind: &'static str,
    pub outcome: &'static str,
}

/// Latency bucket bounds in seconds: a hit from page cache to a slow upstream layer.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

type LatencyFamily = Family<LatencyLabels, Histogram, fn() -> Histogram>;

/// Why a client was refused before anything was fetched for it (`stowage_refusals_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client's address is outside the listener's `allow` list (403).
    AllowList,
    /// `[proxy] users_file` is set and the `Proxy-Authorization` was missing or wrong (407).
    ProxyAuth,
    /// The mirror listener's `users` refused the client's credentials (401).
    MirrorAuth,
    /// A tunnel or forward to a host that is not a registry on a port outside
    /// `[proxy] tunnel_ports` (403).
    TunnelPort,
    /// `[proxy] other_hosts = "deny"` and the host is not a registry (403).
    OtherHost,
    /// A tunnel or forward to an internal address, or a name that does not resolve (403/502).
    Destination,
    /// A repository `[[registry]] allow` / `deny` does not let through (403 `DENIED`).
    Repository,
    /// The request would lead back to Stowage itself (508).
    Loop,
    /// `[proxy] max_connections` connections are open already (503 or a close).
    ConnectionLimit,
}

impl Refusal {
    pub const ALL: &'static [Refusal] = &[
        Refusal::AllowList,
        Refusal::ProxyAuth,
        Refusal::MirrorAuth,
        Refusal::TunnelPort,
        Refusal::OtherHost,
        Refusal::Destination,
        Refusal::Repository,
        Refusal::Loop,
        Refusal::ConnectionLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::AllowList => "allow_list",
            Refusal::ProxyAuth => "proxy_auth",
            Refusal::MirrorAuth => "mirror_auth",
            Refusal::TunnelPort => "tunnel_port",
            Refusal::OtherHost => "other_host",
            Refusal::Destination => "destination",
            Refusal::Repository => "denied_repository",
            Refusal::Loop => "loop",
            Refusal::ConnectionLimit => "connection_limit",
        }
    }
}

/// Why caching can be paused (`stowage_caching_paused{reason}`).
pub const PAUSE_REASONS: &[&str] = &["disk_full", "write_error"];

/// `upstream_errors` status values that exist at zero for every configured registry.
pub const UPSTREAM_ERROR_KINDS: &[&str] = &[
    "connect", "timeout", "body", "refused", "digest", "429", "500", "502", "503", "504",
];

/// `cache_write_errors` reasons that exist at zero from the start.
pub const WRITE_ERROR_REASONS: &[&str] = &["disk_full", "write", "create", "shared_store"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
}

/// The version and commit this binary was built from (`build.rs`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("STOWAGE_GIT_COMMIT");

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `cache` or `upstream`.
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub registry: String,
    /// An HTTP status, or `connect` / `timeout` / `body`.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    pub registry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Plain totals since start, for `stowage cache stats` (the Prometheus families are
/// write-only by design).
#[derive(Default)]
pub struct Totals {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub coalesced: AtomicU64,
    pub stale: AtomicU64,
    pub passed: AtomicU64,
    pub bytes_cache: AtomicU64,
    pub bytes_upstream: AtomicU64,
}

pub struct Metrics {
    registry: Registry,
    pub totals: Totals,
    pub requests: Family<RequestLabels, Counter>,
    pub bytes_served: Family<SourceLabels, Counter>,
    pub upstream_errors: Family<ErrorLabels, Counter>,
    pub fills_in_flight: Gauge,
    pub coalesced_readers: Counter,
    pub cache_size: Gauge,
    pub cache_objects: Gauge,
    pub cache_max_size: Gauge,
    pub disk_free: Gauge,
    pub min_free: Gauge,
    pub evictions: Counter,
    pub evicted_bytes: Counter,
    pub ratelimit_remaining: Family<RegistryLabels, Gauge>,
    pub quota_guard: Family<RegistryLabels, Gauge>,
    pub certificates_minted: Counter,
    pub cache_write_errors: Family<ReasonLabels, Counter>,
    pub digest_mismatches: Counter,
    pub ratelimit_limit: Family<RegistryLabels, Gauge>,
    pub request_duration: LatencyFamily,
    pub request_first_byte: LatencyFamily,
    pub connections_open: Gauge,
    pub connections_max: Gauge,
    pub refusals: Family<ReasonLabels, Counter>,
    pub caching_paused: Family<ReasonLabels, Gauge>,
    process_cpu: Counter<f64, AtomicU64>,
    process_resident: Gauge,
    process_virtual: Gauge,
    process_open_fds: Gauge,
    process_max_fds: Gauge,
    process_start: Gauge<f64, AtomicU64>,
    /// Hosts that appear as themselves in `registry` labels.
    known: HashSet<crate::oci::Host>,
    /// The last 24 hours for the status page, recorded by the same hooks.
    pub history: History,
}

/// Registry labels the status history tracks apart (the rest are `other`).
pub const HISTORY_REGISTRIES: usize = 64;

/// The `registry` label of every host that is not a configured registry or auth host.
pub const OTHER_REGISTRY: &str = "other";

impl Default for Metrics {
    /// Metrics that know no registry: every `registry` label is `other`.
    fn default() -> Self {
        Metrics::new(std::iter::empty())
    }
}

impl Metrics {
    /// Metrics whose `registry` labels name the `known` hosts (the configured registries
    /// and their auth hosts, any port) and call every other host `other`.
    pub fn new(known: impl IntoIterator<Item = crate::oci::Host>) -> Metrics {
        // No prefix on the registry: `process_*` are standard names; ours say `stowage_`.
        let mut registry = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            bytes_served: Family::default(),
            upstream_errors: Family::default(),
            fills_in_flight: Gauge::default(),
            coalesced_readers: Counter::default(),
            cache_size: Gauge::default(),
            cache_objects: Gauge::default(),
            cache_max_size: Gauge::default(),
            disk_free: Gauge::default(),
            min_free: Gauge::default(),
            evictions: Counter::default(),
            evicted_bytes: Counter::default(),
            ratelimit_remaining: Family::default(),
            quota_guard: Family::default(),
            certificates_minted: Counter::default(),
            cache_write_errors: Family::default(),
            digest_mismatches: Counter::default(),
            ratelimit_limit: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            request_first_byte: Family::new_with_constructor(latency_histogram),
            connections_open: Gauge::default(),
            connections_max: Gauge::default(),
            refusals: Family::default(),
            caching_paused: Family::default(),
            process_cpu: Counter::default(),
            process_resident: Gauge::default(),
            process_virtual: Gauge::default(),
            process_open_fds: Gauge::default(),
            process_max_fds: Gauge::default(),
            process_start: Gauge::default(),
            registry: Registry::default(),
            totals: Totals::default(),
            known: known.into_iter().collect(),
            history: History::new(crate::clock::now_ms(), HISTORY_REGISTRIES),
        };
        registry.register(
            "stowage_requests",
            "Registry requests served, by registry, kind and cache outcome",
            m.requests.clone(),
        );
        registry.register_with_unit(
            "stowage_served",
            "Response body bytes sent to clients, by where they came from",
            Unit::Bytes,
            m.bytes_served.clone(),
        );
        registry.register(
            "stowage_upstream_errors",
            "Upstream failures and error statuses, by registry and status",
            m.upstream_errors.clone(),
        );
        registry.register(
            "stowage_fills_in_flight",
            "Blob downloads into the cache in progress",
            m.fills_in_flight.clone(),
        );
        registry.register(
            "stowage_coalesced_readers",
            "Requests that joined another request's download",
            m.coalesced_readers.clone(),
        );
        registry.register_with_unit(
            "stowage_cache_size",
            "Bytes of verified content in the cache",
            Unit::Bytes,
            m.cache_size.clone(),
        );
        registry.register(
            "stowage_cache_objects",
            "Objects (blobs and manifests) in the cache",
            m.cache_objects.clone(),
        );
        registry.register(
            "stowage_evictions",
            "Objects evicted to keep the cache under max_size",
            m.evictions.clone(),
        );
        registry.register_with_unit(
            "stowage_evicted",
            "Bytes evicted",
            Unit::Bytes,
            m.evicted_bytes.clone(),
        );
        registry.register(
            "stowage_upstream_ratelimit_remaining",
            "Pulls left in the upstream rate-limit window (the ratelimit-remaining header, as Docker Hub sends it)",
            m.ratelimit_remaining.clone(),
        );
        registry.register(
            "stowage_quota_guard_engaged",
            "1 while the quota guard serves this registry's tags without revalidation for some account ([upstream] quota_reserve)",
            m.quota_guard.clone(),
        );
        registry.register(
            "stowage_certificates_minted",
            "Leaf certificates minted from the local CA",
            m.certificates_minted.clone(),
        );
        registry.register(
            "stowage_cache_write_errors",
            "Cache writes that failed (the request was served from upstream)",
            m.cache_write_errors.clone(),
        );
        registry.register(
            "stowage_digest_mismatches",
            "Upstream content that did not match its digest and was discarded",
            m.digest_mismatches.clone(),
        );
        registry.register(
            "stowage_upstream_ratelimit_limit",
            "Pulls allowed in the upstream rate-limit window (the ratelimit-limit header)",
            m.ratelimit_limit.clone(),
        );
        registry.register_with_unit(
            "stowage_cache_max_size",
            "[cache] max_size: eviction keeps the cache below it",
            Unit::Bytes,
            m.cache_max_size.clone(),
        );
        registry.register_with_unit(
            "stowage_cache_disk_free",
            "Free space on the cache's file system (for unprivileged users)",
            Unit::Bytes,
            m.disk_free.clone(),
        );
        registry.register_with_unit(
            "stowage_cache_min_free",
            "[cache] min_free: below this much free disk, caching pauses",
            Unit::Bytes,
            m.min_free.clone(),
        );
        registry.register_with_unit(
            "stowage_request_duration",
            "Registry requests from arrival to the last body byte sent (or the client gone), by kind and outcome",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        registry.register_with_unit(
            "stowage_request_first_byte",
            "Registry requests from arrival to the response head being ready to send, by kind and outcome",
            Unit::Seconds,
            m.request_first_byte.clone(),
        );
        registry.register(
            "stowage_connections_open",
            "Client connections holding a place under [proxy] max_connections",
            m.connections_open.clone(),
        );
        registry.register(
            "stowage_connections_max",
            "[proxy] max_connections",
            m.connections_max.clone(),
        );
        registry.register(
            "stowage_refusals",
            "Clients or requests refused before anything was fetched, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "stowage_caching_paused",
            "1 while new objects are not cached (passed through from upstream), by reason",
            m.caching_paused.clone(),
        );
        registry.register(
            "stowage_build",
            "The version and git commit of this binary",
            Info::new(BuildLabels {
                version: VERSION.to_owned(),
                commit: COMMIT.to_owned(),
            }),
        );
        registry.register_with_unit(
            "process_cpu",
            "User and system CPU time spent by the process",
            Unit::Seconds,
            m.process_cpu.clone(),
        );
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory of the process",
            Unit::Bytes,
            m.process_resident.clone(),
        );
        registry.register_with_unit(
            "process_virtual_memory",
            "Virtual memory of the process",
            Unit::Bytes,
            m.process_virtual.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            m.process_open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "The soft limit on open file descriptors",
            m.process_max_fds.clone(),
        );
        registry.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            m.process_start.clone(),
        );
        for r in Refusal::ALL {
            let _ = m.refusals.get_or_create(&ReasonLabels {
                reason: r.as_str().to_owned(),
            });
        }
        for reason in PAUSE_REASONS {
            let _ = m.caching_paused.get_or_create(&ReasonLabels {
                reason: (*reason).to_owned(),
            });
        }
        for reason in WRITE_ERROR_REASONS {
            let _ = m.cache_write_errors.get_or_create(&ReasonLabels {
                reason: (*reason).to_owned(),
            });
        }
        Metrics { registry, ..m }
    }

    /// Creates, at zero, the series alerts and dashboards look for before anything has gone
    /// wrong: upstream errors of each kind and the quota guard for each configured registry.
    /// Also records `max_connections`.
    pub fn start_at_zero<'a>(
        &self,
        registries: impl IntoIterator<Item = &'a crate::oci::Registry>,
        max_connections: usize,
    ) {
        self.connections_max.set(max_connections as i64);
        for r in registries {
            let registry = self.registry_label(r);
            for status in UPSTREAM_ERROR_KINDS {
                let _ = self.upstream_errors.get_or_create(&ErrorLabels {
                    registry: registry.clone(),
                    status: (*status).to_owned(),
                });
            }
            let _ = self.quota_guard.get_or_create(&RegistryLabels { registry });
        }
    }

    pub fn refused(&self, why: Refusal) {
        self.history
            .error(crate::clock::now_ms(), "refusal", "", "", why.as_str());
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: why.as_str().to_owned(),
            })
            .inc();
    }

    /// Sets `stowage_caching_paused`: 1 for `reason` (if any), 0 for the others.
    pub fn set_caching_paused(&self, reason: Option<&str>) {
        for r in PAUSE_REASONS {
            self.caching_paused
                .get_or_create(&ReasonLabels {
                    reason: (*r).to_owned(),
                })
                .set(i64::from(reason == Some(*r)));
        }
    }

    /// Reads the process's CPU time, memory and descriptors from `/proc/self` now.
    fn sample_process(&self) {
        let Some(p) = process::sample() else {
            return;
        };
        let counted = self.process_cpu.get();
        if p.cpu_seconds > counted {
            self.process_cpu.inc_by(p.cpu_seconds - counted);
        }
        self.process_resident.set(p.resident_bytes as i64);
        self.process_virtual.set(p.virtual_bytes as i64);
        self.process_open_fds.set(p.open_fds as i64);
        self.process_max_fds.set(p.max_fds as i64);
        self.process_start.set(p.start_time_seconds);
    }

    /// `registry` as a label value: its one text form when its host is known, else `other`.
    pub fn registry_label(&self, registry: &crate::oci::Registry) -> String {
        if self.known.contains(registry.host()) {
            registry.to_string()
        } else {
            OTHER_REGISTRY.to_owned()
        }
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn render(&self) -> String {
        self.sample_process();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn upstream_error(&self, registry: &crate::oci::Registry, status: &str) {
        self.upstream_errors
            .get_or_create(&ErrorLabels {
                registry: self.registry_label(registry),
                status: status.to_owned(),
            })
            .inc();
    }

    /// An upstream failure of kind `status` (one of [`UPSTREAM_ERROR_KINDS`] or a status)
    /// for `repo`, counted and listed on the status page with `detail` (secrets removed).
    pub fn upstream_failure(
        &self,
        registry: &crate::oci::Registry,
        repo: &str,
        status: &str,
        detail: &str,
    ) {
        let label = self.registry_label(registry);
        self.history
            .upstream_error(crate::clock::now_ms(), &label, repo, status, detail);
        self.upstream_errors
            .get_or_create(&ErrorLabels {
                registry: label,
                status: status.to_owned(),
            })
            .inc();
    }

    /// A digest mismatch: counted, and listed on the status page.
    pub fn digest_mismatch(&self, registry: &crate::oci::Registry, repo: &str, detail: &str) {
        self.digest_mismatches.inc();
        self.history.error(
            crate::clock::now_ms(),
            "digest",
            &self.registry_label(registry),
            repo,
            detail,
        );
    }

    /// Records `ratelimit-remaining: 76;w=21600` as 76.
    pub fn observe_ratelimit(&self, registry: &crate::oci::Registry, headers: &http::HeaderMap) {
        let Some(v) = headers
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        let first = |v: &str| v.split(';').next().unwrap_or("").trim().parse::<i64>().ok();
        let labels = RegistryLabels {
            registry: self.registry_label(registry),
        };
        if let Some(n) = first(v) {
            self.ratelimit_remaining.get_or_create(&labels).set(n);
        }
        if let Some(n) = headers
            .get("ratelimit-limit")
            .and_then(|v| v.to_str().ok())
            .and_then(first)
        {
            self.ratelimit_limit.get_or_create(&labels).set(n);
        }
    }

    pub fn traffic(&self) -> Traffic {
        let t = &self.totals;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Traffic {
            hits: g(&t.hits),
            misses: g(&t.misses),
            coalesced: g(&t.coalesced),
            stale: g(&t.stale),
            passed: g(&t.passed),
            bytes_saved: g(&t.bytes_cache),
            bytes_from_upstream: g(&t.bytes_upstream),
        }
    }

    pub fn write_error(&self, reason: &str) {
        self.history
            .error(crate::clock::now_ms(), "storage", "", "", reason);
        self.cache_write_errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub stale: u64,
    pub passed: u64,
    /// Bytes served from the cache: what upstream did not have to send.
    pub bytes_saved: u64,
    pub bytes_from_upstream: u64,
}

impl Traffic {
    /// Hits (including coalesced and stale) over requests that could be cached.
    pub fn hit_ratio(&self) -> Option<f64> {
        let served = self.hits + self.coalesced + self.stale;
        let total = served + self.misses;
        (total > 0).then(|| served as f64 / total as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_conventional_names() {
        let m = Metrics::new(["registry-1.docker.io".parse().unwrap()]);
        m.requests
            .get_or_create(&RequestLabels {
                registry: "quay.io".into(),
                kind: "blob",
                outcome: "hit",
                code: code_label(200),
            })
            .inc();
        m.bytes_served
            .get_or_create(&SourceLabels { source: "cache" })
            .inc_by(10);
        let mut h = http::HeaderMap::new();
        h.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
        m.observe_ratelimit(&"registry-1.docker.io".parse().unwrap(), &h);
        let text = m.render();
        assert!(
            text.contains(
                r#"stowage_requests_total{registry="quay.io",kind="blob",outcome="hit",code="200"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"stowage_served_bytes_total{source="cache"} 10"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"stowage_upstream_ratelimit_remaining{registry="registry-1.docker.io"} 76"#
            ),
            "{text}"
        );
        assert!(text.contains("stowage_cache_size_bytes"), "{text}");
    }

    #[test]
    fn status_codes_are_a_bounded_label() {
        assert_eq!(code_label(200), "200");
        assert_eq!(code_label(429), "429");
        assert_eq!(code_label(201), "2xx");
        assert_eq!(code_label(418), "4xx");
        assert_eq!(code_label(599), "5xx");
        assert_eq!(code_label(101), "1xx");
        for (i, &c) in STATUS_CODES.iter().enumerate() {
            assert_eq!(code_label(c), c.to_string(), "{i}");
        }
        let all: HashSet<&str> = (0..1000).map(code_label).collect();
        assert!(all.len() <= STATUS_CODES.len() + 5, "{all:?}");
    }

    #[test]
    fn error_refusal_and_quota_series_exist_at_zero() {
        let m = Metrics::new(["quay.io".parse().unwrap()]);
        m.start_at_zero(&["quay.io".parse().unwrap()], 1024);
        m.set_caching_paused(None);
        let text = m.render();
        for line in [
            r#"stowage_upstream_errors_total{registry="quay.io",status="429"} 0"#,
            r#"stowage_upstream_errors_total{registry="quay.io",status="connect"} 0"#,
            r#"stowage_quota_guard_engaged{registry="quay.io"} 0"#,
            r#"stowage_refusals_total{reason="allow_list"} 0"#,
            r#"stowage_refusals_total{reason="loop"} 0"#,
            r#"stowage_cache_write_errors_total{reason="disk_full"} 0"#,
            r#"stowage_caching_paused{reason="disk_full"} 0"#,
            "stowage_digest_mismatches_total 0",
            "stowage_connections_max 1024",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        m.set_caching_paused(Some("write_error"));
        assert!(m
            .render()
            .contains(r#"stowage_caching_paused{reason="write_error"} 1"#));
    }

    #[test]
    fn build_info_and_process_metrics_are_exported() {
        let text = Metrics::default().render();
        assert!(
            text.contains(&format!(
                r#"stowage_build_info{{version="{VERSION}",commit="{COMMIT}"}} 1"#
            )),
            "{text}"
        );
        assert!(!COMMIT.is_empty());
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .parse()
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e6, "{text}");
        assert!(value("process_open_fds") >= 3.0, "{text}");
        assert!(value("process_start_time_seconds") > 1.6e9, "{text}");
        assert!(value("process_cpu_seconds_total") >= 0.0, "{text}");
    }

    #[test]
    fn ratelimit_limit_is_recorded_with_remaining() {
        let m = Metrics::new(["registry-1.docker.io".parse().unwrap()]);
        let mut h = http::HeaderMap::new();
        h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "7;w=21600".parse().unwrap());
        m.observe_ratelimit(&"registry-1.docker.io".parse().unwrap(), &h);
        let text = m.render();
        assert!(
            text.contains(
                r#"stowage_upstream_ratelimit_limit{registry="registry-1.docker.io"} 100"#
            ),
            "{text}"
        );
    }

    #[test]
    fn only_known_hosts_are_registry_labels() {
        let m = Metrics::new(["quay.io".parse().unwrap()]);
        let label = |r: &str| m.registry_label(&r.parse().unwrap());
        assert_eq!(label("quay.io"), "quay.io");
        assert_eq!(label("quay.io:5000"), "quay.io:5000");
        assert_eq!(label("http://quay.io"), "http://quay.io");
        assert_eq!(label("a.invalid"), "other");
        assert_eq!(label("http://b.invalid:8080"), "other");
        m.upstream_error(&"c.invalid".parse().unwrap(), "502");
        assert!(m
            .render()
            .contains(r#"stowage_upstream_errors_total{registry="other",status="502"} 1"#));
    }
}
