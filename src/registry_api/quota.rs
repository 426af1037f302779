//! The quota guard: Docker Hub counts manifest pulls per account in a window and says how
//! many are left (`ratelimit-limit: 100;w=21600`, `ratelimit-remaining: 76;w=21600`). When
//! an account's remaining share drops below `[upstream] quota_reserve`, tags of that
//! registry are served from the cache without revalidation (marked stale) until the window
//! has passed, so the pulls left go to what is not cached. One log line when the guard
//! engages for an account and one when it releases; `stowage_quota_guard_engaged` shows it.
//!
//! An account is (registry, SHA-256 of the credential sent upstream): each configured
//! account and each client's own credential apart, and one for anonymous requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderMap;

use crate::oci::Registry;
use crate::telemetry::metrics::{Metrics, RegistryLabels};

/// What the last answer said about one account's window.
struct Window {
    remaining: u64,
    limit: u64,
    /// When the window the answer spoke of has passed.
    until: Instant,
}

pub struct QuotaGuard {
    /// Below this share of `limit` left, the guard engages (0: never).
    reserve: f64,
    engaged: Mutex<HashMap<(Registry, [u8; 32]), Window>>,
    /// The last rate-limit answer per account, for the status page; at most [`SEEN_MAX`].
    seen: Mutex<HashMap<(Registry, [u8; 32]), Seen>>,
    metrics: Arc<Metrics>,
}

/// Accounts whose last rate-limit answer the status page shows; the oldest goes first.
pub const SEEN_MAX: usize = 256;

struct Seen {
    remaining: u64,
    limit: u64,
    at_ms: u64,
}

/// One account's rate-limit headroom as upstream last stated it (`/status.json`
/// `registries[].ratelimit[]`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Headroom {
    /// `anonymous`, or `credential <first 8 hex of its SHA-256>` (never the credential).
    pub account: String,
    pub remaining: u64,
    pub limit: u64,
    /// remaining / limit, `null` when the limit is 0.
    pub headroom: Option<f64>,
    /// When upstream said so (ms since the epoch).
    pub seen_ms: u64,
    /// Whether the quota guard serves this account's tags without revalidation now.
    pub guard_engaged: bool,
}

/// `76;w=21600` → (76, 21600 s). A value without a window is one for Docker Hub's six hours.
fn parse(value: &str) -> Option<(u64, Duration)> {
    let mut parts = value.split(';');
    let n = parts.next()?.trim().parse().ok()?;
    let window = parts
        .find_map(|p| p.trim().strip_prefix("w="))
        .and_then(|w| w.trim().parse().ok())
        .unwrap_or(21_600);
    Some((n, Duration::from_secs(window)))
}

impl QuotaGuard {
    pub fn new(reserve: f64, metrics: Arc<Metrics>) -> QuotaGuard {
        QuotaGuard {
            reserve,
            engaged: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Reads an upstream answer's rate-limit headers for `credential` on `registry`.
    pub fn observe(&self, registry: &Registry, credential: [u8; 32], headers: &HeaderMap) {
        if !headers.contains_key("ratelimit-remaining") {
            return;
        }
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(parse)
        };
        let (Some((remaining, window)), Some((limit, _))) =
            (header("ratelimit-remaining"), header("ratelimit-limit"))
        else {
            return;
        };
        self.remember(registry, credential, remaining, limit);
        if self.reserve <= 0.0 {
            return;
        }
        let low = limit > 0 && (remaining as f64) < self.reserve * limit as f64;
        let key = (registry.clone(), credential);
        let mut engaged = self.engaged.lock().expect("quota lock");
        self.release_passed(&mut engaged);
        let was = engaged.contains_key(&key);
        if low {
            if !was {
                tracing::warn!(%registry, account = %account(&credential), remaining, limit, window_s = window.as_secs(), "quota guard engaged: tags are served from the cache without revalidation until the window has passed");
            }
            engaged.insert(
                key,
                Window {
                    remaining,
                    limit,
                    until: Instant::now() + window,
                },
            );
        } else if was {
            engaged.remove(&key);
            tracing::info!(%registry, account = %account(&credential), remaining, limit, "quota guard released");
        }
        self.set_gauge(registry, &engaged);
    }

    fn remember(&self, registry: &Registry, credential: [u8; 32], remaining: u64, limit: u64) {
        let mut seen = self.seen.lock().expect("quota seen lock");
        let key = (registry.clone(), credential);
        if !seen.contains_key(&key) && seen.len() >= SEEN_MAX {
            if let Some(oldest) = seen
                .iter()
                .min_by_key(|(_, s)| s.at_ms)
                .map(|(k, _)| k.clone())
            {
                seen.remove(&oldest);
            }
        }
        seen.insert(
            key,
            Seen {
                remaining,
                limit,
                at_ms: crate::clock::now_ms(),
            },
        );
    }

    /// Every account's last stated headroom on `registry`, lowest headroom first.
    pub fn headroom(&self, registry: &Registry) -> Vec<Headroom> {
        let rows: Vec<(String, [u8; 32], u64, u64, u64)> = {
            let seen = self.seen.lock().expect("quota seen lock");
            seen.iter()
                .filter(|((r, _), _)| r == registry)
                .map(|((_, c), s)| (account(c), *c, s.remaining, s.limit, s.at_ms))
                .collect()
        };
        let mut out: Vec<Headroom> = rows
            .into_iter()
            .map(|(account, c, remaining, limit, seen_ms)| Headroom {
                account,
                remaining,
                limit,
                headroom: (limit > 0).then(|| remaining as f64 / limit as f64),
                seen_ms,
                guard_engaged: self.engaged(registry, c),
            })
            .collect();
        out.sort_by(|a, b| {
            a.headroom
                .unwrap_or(1.0)
                .total_cmp(&b.headroom.unwrap_or(1.0))
                .then(a.account.cmp(&b.account))
        });
        out
    }

    /// Whether the guard is engaged for any account of `registry` now.
    pub fn engaged_anywhere(&self, registry: &Registry) -> bool {
        let mut engaged = self.engaged.lock().expect("quota lock");
        self.release_passed(&mut engaged);
        engaged.keys().any(|(r, _)| r == registry)
    }

    /// Whether tags of `registry` are served without revalidation for `credential` now.
    pub fn engaged(&self, registry: &Registry, credential: [u8; 32]) -> bool {
        let mut engaged = self.engaged.lock().expect("quota lock");
        self.release_passed(&mut engaged);
        engaged.contains_key(&(registry.clone(), credential))
    }

    /// Releases every account whose window has passed (one log line each).
    fn release_passed(&self, engaged: &mut HashMap<(Registry, [u8; 32]), Window>) {
        let now = Instant::now();
        let mut released = Vec::new();
        engaged.retain(|(registry, credential), w| {
            if now < w.until {
                return true;
            }
            tracing::info!(%registry, account = %account(credential), remaining = w.remaining, limit = w.limit, "quota guard released: the window has passed");
            released.push(registry.clone());
            false
        });
        for registry in released {
            self.set_gauge(&registry, engaged);
        }
    }

    fn set_gauge(&self, registry: &Registry, engaged: &HashMap<(Registry, [u8; 32]), Window>) {
        let on = engaged.keys().any(|(r, _)| r == registry);
        self.metrics
            .quota_guard
            .get_or_create(&RegistryLabels {
                registry: self.metrics.registry_label(registry),
            })
            .set(i64::from(on));
    }
}

/// An account as logs show it: `anonymous`, or the first bytes of its credential's hash.
fn account(credential: &[u8; 32]) -> String {
    if credential == &[0; 32] {
        "anonymous".into()
    } else {
        format!("credential {}", hex::encode(&credential[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_values_parse() {
        assert_eq!(parse("76;w=21600"), Some((76, Duration::from_secs(21600))));
        assert_eq!(parse(" 5 ; w=60 "), Some((5, Duration::from_secs(60))));
        assert_eq!(parse("100"), Some((100, Duration::from_secs(21600))));
        assert_eq!(parse("x;w=1"), None);
    }
}
