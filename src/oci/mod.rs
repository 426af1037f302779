//! Request text becomes types here, and only here: registries, repositories, tags, digests
//! and routes. Every other module receives these types, never the raw strings.

pub mod image_ref;
pub mod keys;
pub mod names;
pub mod origin;
pub mod platform;
pub mod route;

pub use image_ref::{ImageRef, ImageRefError};
pub use keys::{RepoKey, TagKey};
pub use names::{Algorithm, Digest, ParseError, Reference, RepoName, Tag};
pub use origin::{Host, OriginError, Registry, Scheme};
pub use platform::{Platform, PlatformError};
pub use route::{PathRepo, Route};
