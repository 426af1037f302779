//! Who may read what (see [`policy`]): one decision for the fresh, stale and offline paths,
//! and the questions it asks upstream ([`probe`]).

pub mod policy;
pub mod probe;

pub use policy::{Access, Ask, Authorized, Refusal, Reply, UpstreamNow};
