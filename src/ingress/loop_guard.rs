//! Request loops: a registry name (or pin, or CONNECT target) that leads back to one of
//! Stowage's own listeners would recurse, and would turn a remote client into a local one.
//! The one check for every way in (the address set and its matching live in
//! `upstream::destination`, which refuses the same listeners as redirect targets).

use http::{Response, StatusCode};

use crate::http_util::Body;
use crate::oci::Registry;
use crate::registry_api::registry_error;
use crate::upstream::Resolver;

pub use crate::upstream::destination::{canonical_ip, OwnAddresses};

/// A clear `508` when `registry` resolves to one of `own`'s listeners.
pub async fn check(
    own: &OwnAddresses,
    resolver: &Resolver,
    registry: &Registry,
) -> Option<Response<Body>> {
    let addrs = resolver
        .resolve(registry.host().as_str(), registry.port())
        .await
        .ok()?;
    let found = addrs.iter().find(|a| own.contains(a))?;
    tracing::error!(%registry, address = %found, "upstream resolves to this Stowage: refusing a request loop");
    Some(registry_error(
            StatusCode::LOOP_DETECTED,
            "UNAVAILABLE",
            &format!(
                "{} resolves to this Stowage ({found}); the proxy host must resolve registries for real, or pin them in [upstream.resolve]",
                registry.host()
            ),
        ))
}
