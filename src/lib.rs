//! Stowage: a caching forward proxy for container registries.
//!
//! The crate is the whole server; `main.rs` only parses the command line. The path of a
//! request through the modules:
//!
//! - [`server`] binds the listener and owns the shared [`server::State`];
//! - [`proxy`] accepts client connections, answers `CONNECT`, terminates TLS with leaves
//!   from [`ca`], or relays blind tunnels;
//! - [`registry`] classifies each request inside the tunnel ([`oci::Route`]) and serves
//!   blobs and manifests by digest from [`store`], coalescing misses through [`fill`];
//! - [`upstream`] is Stowage's own pooled client towards registries and storage hosts;
//! - [`response`] turns errors into registry JSON and writes the access log;
//! - [`config`] parses and validates the TOML configuration.

pub mod access;
pub mod admin;
pub mod auth;
pub mod backend;
pub mod ca;
pub mod config;
pub mod fill;
pub mod guard;
pub mod index;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod proxy;
pub mod registry;
pub mod response;
pub mod server;
pub mod setup;
pub mod store;
pub mod upstream;

pub use config::Config;
pub use server::{Error, Server};
