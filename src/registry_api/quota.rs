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
    metrics: Arc<Metrics>,
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
            metrics,
        }
    }

    /// Reads an upstream answer's rate-limit headers for `credential` on `registry`.
    pub fn observe(&self, registry: &Registry, credential: [u8; 32], headers: &HeaderMap) {
        if self.reserve <= 0.0 {
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
