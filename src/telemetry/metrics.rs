//! Prometheus metrics, served at `GET /metrics` on the proxy listener.
//!
//! Counters are bumped where things happen (the access-log body, fills, the CA, the
//! evictor); gauges that mirror live state (cache size, fills in flight) are read when a
//! scrape renders, so they can never drift.
//!
//! A `registry` label names only configured registries and their auth hosts; any other host
//! a request names (absolute-form URLs, `ns=` with `any_registry`, storage hosts) is
//! `other`, so clients cannot create series by asking for new names.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub registry: String,
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `cache` or `upstream`.
    pub source: String,
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
    pub evictions: Counter,
    pub evicted_bytes: Counter,
    pub ratelimit_remaining: Family<RegistryLabels, Gauge>,
    pub quota_guard: Family<RegistryLabels, Gauge>,
    pub certificates_minted: Counter,
    pub cache_write_errors: Family<ReasonLabels, Counter>,
    pub digest_mismatches: Counter,
    /// Hosts that appear as themselves in `registry` labels.
    known: HashSet<crate::oci::Host>,
}

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
        let mut registry = Registry::with_prefix("stowage");
        let m = Metrics {
            requests: Family::default(),
            bytes_served: Family::default(),
            upstream_errors: Family::default(),
            fills_in_flight: Gauge::default(),
            coalesced_readers: Counter::default(),
            cache_size: Gauge::default(),
            cache_objects: Gauge::default(),
            evictions: Counter::default(),
            evicted_bytes: Counter::default(),
            ratelimit_remaining: Family::default(),
            quota_guard: Family::default(),
            certificates_minted: Counter::default(),
            cache_write_errors: Family::default(),
            digest_mismatches: Counter::default(),
            registry: Registry::default(),
            totals: Totals::default(),
            known: known.into_iter().collect(),
        };
        registry.register(
            "requests",
            "Registry requests served, by registry, kind and cache outcome",
            m.requests.clone(),
        );
        registry.register_with_unit(
            "served",
            "Response body bytes sent to clients, by where they came from",
            Unit::Bytes,
            m.bytes_served.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures and error statuses, by registry and status",
            m.upstream_errors.clone(),
        );
        registry.register(
            "fills_in_flight",
            "Blob downloads into the cache in progress",
            m.fills_in_flight.clone(),
        );
        registry.register(
            "coalesced_readers",
            "Requests that joined another request's download",
            m.coalesced_readers.clone(),
        );
        registry.register_with_unit(
            "cache_size",
            "Bytes of verified content in the cache",
            Unit::Bytes,
            m.cache_size.clone(),
        );
        registry.register(
            "cache_objects",
            "Objects (blobs and manifests) in the cache",
            m.cache_objects.clone(),
        );
        registry.register(
            "evictions",
            "Objects evicted to keep the cache under max_size",
            m.evictions.clone(),
        );
        registry.register_with_unit(
            "evicted",
            "Bytes evicted",
            Unit::Bytes,
            m.evicted_bytes.clone(),
        );
        registry.register(
            "upstream_ratelimit_remaining",
            "Pulls left in the upstream rate-limit window (the ratelimit-remaining header, as Docker Hub sends it)",
            m.ratelimit_remaining.clone(),
        );
        registry.register(
            "quota_guard_engaged",
            "1 while the quota guard serves this registry's tags without revalidation for some account ([upstream] quota_reserve)",
            m.quota_guard.clone(),
        );
        registry.register(
            "certificates_minted",
            "Leaf certificates minted from the local CA",
            m.certificates_minted.clone(),
        );
        registry.register(
            "cache_write_errors",
            "Cache writes that failed (the request was served from upstream)",
            m.cache_write_errors.clone(),
        );
        registry.register(
            "digest_mismatches",
            "Upstream content that did not match its digest and was discarded",
            m.digest_mismatches.clone(),
        );
        Metrics { registry, ..m }
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

    /// Records `ratelimit-remaining: 76;w=21600` as 76.
    pub fn observe_ratelimit(&self, registry: &crate::oci::Registry, headers: &http::HeaderMap) {
        let Some(v) = headers
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        if let Ok(n) = v.split(';').next().unwrap_or("").trim().parse::<i64>() {
            self.ratelimit_remaining
                .get_or_create(&RegistryLabels {
                    registry: self.registry_label(registry),
                })
                .set(n);
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
                kind: "blob".into(),
                outcome: "hit".into(),
            })
            .inc();
        m.bytes_served
            .get_or_create(&SourceLabels {
                source: "cache".into(),
            })
            .inc_by(10);
        let mut h = http::HeaderMap::new();
        h.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
        m.observe_ratelimit(&"registry-1.docker.io".parse().unwrap(), &h);
        let text = m.render();
        assert!(
            text.contains(
                r#"stowage_requests_total{registry="quay.io",kind="blob",outcome="hit"} 1"#
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
