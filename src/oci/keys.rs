//! Keys for what is cached and who may read it, each with one text encoding.
//!
//! A [`RepoKey`] is a repository of one [`Registry`]: the unit of access decisions, public
//! marks and digest membership. A [`TagKey`] is a tag of one repository. Their `Display`
//! forms (`quay.io:5000/org/app`, `quay.io:5000/org/app:1.2`) are the only encodings, used
//! for metadata rows, logs and `cache ls`; `FromStr` reads them back. Neither can be
//! ambiguous: a registry holds no `/`, repository names hold no `:` or `@`, tags hold no `/`.

use std::fmt;
use std::str::FromStr;

use super::names::{RepoName, Tag};
use super::origin::Registry;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a registry/repository[:tag] key")]
pub struct KeyError(String);

fn key_error(s: &str) -> KeyError {
    KeyError(s.chars().take(120).collect())
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoKey {
    pub registry: Registry,
    pub repo: RepoName,
}

impl RepoKey {
    pub fn new(registry: Registry, repo: RepoName) -> RepoKey {
        RepoKey { registry, repo }
    }
}

impl fmt::Display for RepoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repo)
    }
}

impl FromStr for RepoKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (prefix, rest) = match s.strip_prefix("http://") {
            Some(rest) => ("http://", rest),
            None => ("", s),
        };
        let (authority, repo) = rest.split_once('/').ok_or_else(|| key_error(s))?;
        let registry = format!("{prefix}{authority}")
            .parse()
            .map_err(|_| key_error(s))?;
        let repo = repo.parse().map_err(|_| key_error(s))?;
        Ok(RepoKey { registry, repo })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TagKey {
    pub repo: RepoKey,
    pub tag: Tag,
}

impl TagKey {
    pub fn new(repo: RepoKey, tag: Tag) -> TagKey {
        TagKey { repo, tag }
    }
}

impl fmt::Display for TagKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.repo, self.tag.as_str())
    }
}

impl FromStr for TagKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (repo, tag) = s.rsplit_once(':').ok_or_else(|| key_error(s))?;
        Ok(TagKey {
            repo: repo.parse().map_err(|_| key_error(s))?,
            tag: tag.parse().map_err(|_| key_error(s))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_round_trip_and_keep_the_registry_whole() {
        for s in [
            "quay.io/org/app",
            "quay.io:5000/org/app",
            "http://quay.io:5000/org/app",
            "[::1]:5000/a/b/c",
        ] {
            let k: RepoKey = s.parse().unwrap();
            assert_eq!(k.to_string(), s);
        }
        let k: TagKey = "quay.io:5000/org/app:v1.2".parse().unwrap();
        assert_eq!(k.repo.registry.port(), 5000);
        assert_eq!(k.repo.repo.as_str(), "org/app");
        assert_eq!(k.tag.as_str(), "v1.2");
        assert_eq!(k.to_string(), "quay.io:5000/org/app:v1.2");
        let a: RepoKey = "quay.io/team/private".parse().unwrap();
        let b: RepoKey = "quay.io:5000/team/private".parse().unwrap();
        let c: RepoKey = "http://quay.io/team/private".parse().unwrap();
        assert!(a != b && a != c && b != c);
        for bad in ["quay.io", "quay.io:5000/", "quay.io/Bad", "quay.io/a:"] {
            assert!(bad.parse::<RepoKey>().is_err(), "{bad}");
        }
        assert!("quay.io:5000/org/app".parse::<TagKey>().is_err());
    }

    proptest! {
        #[test]
        fn any_valid_key_round_trips(
            http in any::<bool>(),
            host in "[a-z]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z]{1,5}){0,2}",
            port in 1u16..,
            repo in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,3}",
            tag in "[A-Za-z0-9_][A-Za-z0-9._-]{0,20}",
        ) {
            let scheme = if http { super::super::origin::Scheme::Http } else { super::super::origin::Scheme::Https };
            let registry = Registry::new(scheme, host.parse().unwrap(), port);
            let key = TagKey::new(RepoKey::new(registry, repo.parse().unwrap()), tag.parse().unwrap());
            prop_assert_eq!(key.to_string().parse::<TagKey>().unwrap(), key.clone());
            prop_assert_eq!(key.repo.to_string().parse::<RepoKey>().unwrap(), key.repo);
        }
    }
}
