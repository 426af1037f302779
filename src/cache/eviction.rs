//! Eviction policy: keep the cache under `max_size`, least recently used first, down to a
//! low watermark, in the background; and persist access times so the order survives
//! restarts. Storage mechanics stay in `content`; the choice of victims in `index`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Cache, StoreError};
use crate::telemetry::Metrics;

/// Evict down to this fraction of `max_size`.
const LOW_WATERMARK: f64 = 0.9;
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(30);

/// Runs until `shutdown`: woken when an insert takes the cache past `max_size`, and every
/// `HOUSEKEEPING_INTERVAL` to flush access times.
pub async fn run(cache: Arc<Cache>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = cache.store.pressure.notified() => {}
            () = tokio::time::sleep(HOUSEKEEPING_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
        let c = cache.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut evicted = (0, 0);
            let max = c.limits.max_size;
            if c.store.index.total() > max {
                let target = (max as f64 * LOW_WATERMARK) as u64;
                evicted = c.store.evict(target, None)?;
            }
            c.store.flush_atimes()?;
            Ok::<_, StoreError>(evicted)
        })
        .await;
        match result {
            Ok(Ok((0, _))) => {}
            Ok(Ok((n, bytes))) => {
                metrics.evictions.inc_by(n);
                metrics.evicted_bytes.inc_by(bytes);
                tracing::info!(
                    objects = n,
                    bytes,
                    size = cache.store.index.total(),
                    "evicted least recently used objects"
                );
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cache housekeeping failed"),
            Err(e) => tracing::warn!(error = %e, "cache housekeeping task failed"),
        }
    }
}
