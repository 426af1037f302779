//! Metrics and logs: the Prometheus registry ([`metrics`]) and the per-request outcome and
//! access-log line ([`access_log`]). Secrets never reach either.

pub mod access_log;
pub mod history;
pub mod log_format;
pub mod log_writer;
pub mod metrics;
pub mod process;

pub use access_log::{CacheStatus, LogLine, Logged};
pub use metrics::Metrics;
