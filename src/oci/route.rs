//! The request classifier: which part of the registry API a path addresses.
//!
//! Percent-encoded or otherwise odd paths fall through to `Route::Other`: they are
//! forwarded, never used for the cache.

use super::names::{Digest, Reference, RepoName};

/// Which part of the registry API a request addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: RepoName, digest: Digest },
    /// `/v2/<name>/manifests/<reference>`
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    /// Anything else: `/v2/`, tags list, uploads, token endpoints, unparseable paths.
    Other,
}

/// Which repository a request path is about ([`Route::repository_in`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathRepo {
    /// No repository: `/v2/`, `_catalog`, token endpoints, paths outside `/v2/`.
    None,
    Named(RepoName),
    /// A repository path whose name cannot be read as one (percent-encoded, malformed):
    /// upstream may decode it into any repository.
    Unknown,
}

impl Route {
    /// Classifies a request path (without query). Percent-encoded or otherwise odd paths
    /// fall through to `Other`: they are forwarded, never used for the cache.
    pub fn classify(path: &str) -> Route {
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Route::Other;
        };
        if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
            if let (Ok(name), Ok(digest)) = (name.parse(), digest.parse()) {
                return Route::Blob { name, digest };
            }
        }
        if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
            let Ok(name) = name.parse() else {
                return Route::Other;
            };
            if let Ok(digest) = reference.parse() {
                return Route::Manifest {
                    name,
                    reference: Reference::Digest(digest),
                };
            }
            if let Ok(tag) = reference.parse() {
                return Route::Manifest {
                    name,
                    reference: Reference::Tag(tag),
                };
            }
        }
        Route::Other
    }

    /// The repository any registry API path names, for requests that are not blobs or
    /// manifests too (tags lists, uploads, referrers): [`PathRepo`].
    pub fn repository_in(path: &str) -> PathRepo {
        let Some(rest) = path.strip_prefix("/v2/") else {
            return PathRepo::None;
        };
        if path.contains('%') {
            return PathRepo::Unknown;
        }
        let marker = ["/blobs/", "/manifests/", "/tags/", "/referrers/"]
            .iter()
            .filter_map(|m| rest.rfind(m))
            .max();
        match marker {
            None => PathRepo::None,
            Some(i) => rest[..i].parse().map_or(PathRepo::Unknown, PathRepo::Named),
        }
    }

    /// The request path of a blob or manifest route, the one [`Route::classify`] reads back
    /// as this route; `None` for `Other`.
    pub fn path(&self) -> Option<String> {
        match self {
            Route::Blob { name, digest } => Some(format!("/v2/{name}/blobs/{digest}")),
            Route::Manifest { name, reference } => {
                Some(format!("/v2/{name}/manifests/{reference}"))
            }
            Route::Other => None,
        }
    }

    /// The repository a route is about, for logs.
    pub fn repo(&self) -> Option<&RepoName> {
        match self {
            Route::Blob { name, .. } | Route::Manifest { name, .. } => Some(name),
            Route::Other => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Route::Blob { .. } => "blob",
            Route::Manifest {
                reference: Reference::Digest(_),
                ..
            } => "manifest",
            Route::Manifest {
                reference: Reference::Tag(_),
                ..
            } => "tag",
            Route::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_is_what_classify_reads_back() {
        let name: RepoName = "library/alpine".parse().unwrap();
        let digest: Digest = format!("sha256:{HEX}").parse().unwrap();
        for route in [
            Route::Blob {
                name: name.clone(),
                digest: digest.clone(),
            },
            Route::Manifest {
                name: name.clone(),
                reference: Reference::Digest(digest.clone()),
            },
            Route::Manifest {
                name: name.clone(),
                reference: Reference::Tag("3.20".parse().unwrap()),
            },
        ] {
            let path = route.path().unwrap();
            assert_eq!(Route::classify(&path), route, "{path}");
        }
        assert_eq!(Route::Other.path(), None);
    }

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn routes_classify() {
        let blob = format!("/v2/library/alpine/blobs/sha256:{HEX}");
        match Route::classify(&blob) {
            Route::Blob { name, digest } => {
                assert_eq!(name.as_str(), "library/alpine");
                assert_eq!(digest.hex(), HEX);
            }
            other => panic!("{other:?}"),
        }
        let m = format!("/v2/a/blobs/x/manifests/sha256:{HEX}");
        assert!(matches!(
            Route::classify(&m),
            Route::Manifest {
                reference: Reference::Digest(_),
                ..
            }
        ));
        assert_eq!(Route::classify("/v2/a/manifests/latest").kind(), "tag");
        assert_eq!(Route::classify("/v2/"), Route::Other);
        assert_eq!(Route::classify("/v2/a/tags/list"), Route::Other);
        assert_eq!(
            Route::classify(&format!("/v2/../blobs/sha256:{HEX}")),
            Route::Other
        );
        assert_eq!(
            Route::classify(&format!("/v2/a/blobs/sha256:{}", &HEX[2..])),
            Route::Other
        );
        assert_eq!(Route::classify("/v2/a/blobs/uploads/"), Route::Other);
        assert_eq!(Route::classify("/token"), Route::Other);
    }

    #[test]
    fn paths_name_their_repository() {
        let named = |s: &str| PathRepo::Named(s.parse().unwrap());
        assert_eq!(Route::repository_in("/v2/"), PathRepo::None);
        assert_eq!(Route::repository_in("/v2/_catalog"), PathRepo::None);
        assert_eq!(Route::repository_in("/v2/auth"), PathRepo::None);
        assert_eq!(Route::repository_in("/token"), PathRepo::None);
        assert_eq!(Route::repository_in("/v2/a/b/tags/list"), named("a/b"));
        assert_eq!(Route::repository_in("/v2/a/blobs/uploads/"), named("a"));
        assert_eq!(
            Route::repository_in("/v2/a/blobs/uploads/1234-ab"),
            named("a")
        );
        assert_eq!(
            Route::repository_in("/v2/x/tags/y/blobs/uploads/"),
            named("x/tags/y")
        );
        assert_eq!(
            Route::repository_in(&format!("/v2/a/referrers/sha256:{HEX}")),
            named("a")
        );
        assert_eq!(
            Route::repository_in("/v2/a%2Fb/manifests/1"),
            PathRepo::Unknown
        );
        assert_eq!(
            Route::repository_in("/v2/a/secret%2Fmanifests%2F1"),
            PathRepo::Unknown
        );
        assert_eq!(
            Route::repository_in("/v2/../manifests/1"),
            PathRepo::Unknown
        );
    }
}
