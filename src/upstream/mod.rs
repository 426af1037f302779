//! What we fetch: Stowage's own client towards registries and storage hosts.
//!
//! - [`client`]: the pooled client behind [`Transport`], redirects, timeouts;
//! - [`resolver`]: `[upstream.resolve]` pins and cached DNS;
//! - [`destination`]: where Stowage may go on someone else's say-so (redirects, realms,
//!   absolute-form URLs): no loopback, link-local, unspecified or own listener;
//! - [`proxy_chain`]: a corporate proxy in front of every upstream connection;
//! - [`token_auth`]: answering registry challenges with configured credentials.
//!
//! Invariant: every wait is bounded, and credentials only go where the caller says.

pub mod client;
pub mod destination;
pub mod proxy_chain;
pub mod resolver;
pub mod token_auth;

pub use client::{empty, redact, Fetched, Offline, Transport, Upstream, UpstreamError};
pub use resolver::Resolver;
pub use token_auth::{credential_id, Answer, Tokens};
