//! Image references as users write them on the command line: `alpine:3`,
//! `quay.io/org/app:1.2`, `quay.io:5000/org/app@sha256:…`, `docker.io/x/y`. The first
//! component is a registry when it holds a `.` or a `:` or is `localhost` (Docker's rule);
//! otherwise the image is on Docker Hub, where a one-component name gets `library/`. No
//! reference means `latest`.

use std::fmt;
use std::str::FromStr;

use super::keys::{RepoKey, TagKey};
use super::names::{Reference, Tag};
use super::origin::{Registry, DOCKER_HUB};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an image reference like alpine:3, quay.io/org/app:1.2 or registry:5000/app@sha256:<hex>")]
pub struct ImageRefError(String);

/// A registry, repository and tag or digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub repo: RepoKey,
    pub reference: Reference,
}

impl ImageRef {
    /// The tag this reference names, if it names one.
    pub fn tag_key(&self) -> Option<TagKey> {
        match &self.reference {
            Reference::Tag(t) => Some(TagKey::new(self.repo.clone(), t.clone())),
            Reference::Digest(_) => None,
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{}", self.repo, t.as_str()),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

impl FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ImageRefError(s.chars().take(200).collect());
        let (name, reference) = match s.split_once('@') {
            Some((name, digest)) => (name, Reference::Digest(digest.parse().map_err(|_| err())?)),
            None => match s.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => {
                    (name, Reference::Tag(tag.parse().map_err(|_| err())?))
                }
                _ => (s, Reference::Tag("latest".parse::<Tag>().expect("a tag"))),
            },
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (
                    Registry::from_reference_domain(first).map_err(|_| err())?,
                    rest.to_owned(),
                )
            }
            _ => (
                Registry::from_reference_domain(DOCKER_HUB).expect("Docker Hub"),
                name.to_owned(),
            ),
        };
        let path = if registry.host().as_str() == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let repo = path.parse().map_err(|_| err())?;
        Ok(ImageRef {
            repo: RepoKey::new(registry, repo),
            reference,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_read_as_docker_reads_them() {
        let hex = "a".repeat(64);
        for (input, shown) in [
            ("alpine:3", "registry-1.docker.io/library/alpine:3"),
            ("alpine", "registry-1.docker.io/library/alpine:latest"),
            ("docker.io/x/y", "registry-1.docker.io/x/y:latest"),
            (
                "docker.io/alpine:3",
                "registry-1.docker.io/library/alpine:3",
            ),
            ("quay.io/org/app:1.2", "quay.io/org/app:1.2"),
            ("quay.io:5000/org/app:v1", "quay.io:5000/org/app:v1"),
            ("localhost/app", "localhost/app:latest"),
            ("myorg/app:1", "registry-1.docker.io/myorg/app:1"),
        ] {
            let r: ImageRef = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), shown, "{input}");
            assert_eq!(
                r.to_string().parse::<ImageRef>().unwrap(),
                r,
                "{input} round trip"
            );
        }
        let d: ImageRef = format!("quay.io:5000/org/app@sha256:{hex}")
            .parse()
            .unwrap();
        assert_eq!(d.to_string(), format!("quay.io:5000/org/app@sha256:{hex}"));
        assert!(d.tag_key().is_none());
        for bad in [
            "",
            "UPPER/x",
            "quay.io/",
            "a@sha256:12",
            "quay.io/x:bad tag",
            "a/../b",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?}");
        }
    }
}
