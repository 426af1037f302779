//! Stowage: a caching forward proxy for container registries.
//!
//! The crate is the whole server; `main.rs` only parses the command line. Layers, highest
//! first; each names only layers below it (enforced by `tests/layering.rs`, described in
//! `docs/architecture.md`):
//!
//! - [`server`]: the composition root: builds every layer from validated settings, runs the
//!   listeners and housekeeping, drains on shutdown;
//! - [`ingress`]: turning a connection into (registry, way in, request): the forward proxy,
//!   tunnels, the mirror, direct SNI, the proxy's own endpoints, allow lists and users, the
//!   local CA;
//! - [`admin`]: cache operations and setup snippets, for `/admin/*` and the CLI;
//! - [`registry_api`]: one `serve` per registry request: blobs, manifests, pass-through;
//! - [`access`]: who may read what: the one access decision;
//! - [`cache`]: what we have: content, metadata, fills, eviction, the shared tier;
//! - [`upstream`]: what we fetch: the client, resolver, proxy chaining, token auth;
//! - [`settings`], [`telemetry`], [`http_util`], [`oci`], [`clock`]: configuration, metrics
//!   and logs, protocol hygiene, request text parsed into types, time.

pub mod access;
pub mod admin;
pub mod cache;
pub mod clock;
pub mod http_util;
pub mod ingress;
pub mod oci;
pub mod registry_api;
pub mod server;
pub mod settings;
pub mod telemetry;
pub mod upstream;

pub use server::{Error, Server};
pub use settings::Config;
