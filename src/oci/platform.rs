//! Platforms as users and image indexes write them: `linux/amd64`, `linux/arm64/v8`. A
//! platform asked for without a variant matches every variant of its OS and architecture;
//! one with a variant matches only that variant (`arm64` without one is `v8`, as
//! containerd normalises it).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a platform like linux/amd64 or linux/arm64/v8")]
pub struct PlatformError(String);

/// An OS, an architecture and maybe a variant, lowercase.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Whether an index entry's platform (`os`, `architecture`, `variant` as the index
    /// says them) is this one.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        if self.os != os || self.architecture != architecture {
            return false;
        }
        let Some(want) = &self.variant else {
            return true;
        };
        let have = match (variant.filter(|v| !v.is_empty()), architecture) {
            (Some(v), _) => v,
            (None, "arm64") => "v8",
            (None, _) => return false,
        };
        want == have
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PlatformError(s.chars().take(100).collect());
        let part = |p: &str| {
            (!p.is_empty()
                && p.len() <= 32
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
            .then(|| p.to_owned())
        };
        let mut parts = s.split('/');
        let os = parts.next().and_then(part).ok_or_else(err)?;
        let architecture = parts.next().and_then(part).ok_or_else(err)?;
        let variant = match parts.next() {
            None => None,
            Some(v) => Some(part(v).ok_or_else(err)?),
        };
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Platform {
            os,
            architecture,
            variant,
        })
    }
}

/// A comma-separated list (`--platform linux/amd64,linux/arm64`).
pub fn parse_list(s: &str) -> Result<Vec<Platform>, PlatformError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match_as_indexes_write_them() {
        let amd: Platform = "linux/amd64".parse().unwrap();
        assert_eq!(amd.to_string(), "linux/amd64");
        assert!(amd.matches("linux", "amd64", None));
        assert!(!amd.matches("linux", "arm64", None));
        assert!(!amd.matches("windows", "amd64", None));
        let arm: Platform = "linux/arm64".parse().unwrap();
        assert!(arm.matches("linux", "arm64", Some("v8")));
        let v8: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(v8.matches("linux", "arm64", None));
        assert!(v8.matches("linux", "arm64", Some("v8")));
        let v7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(!v7.matches("linux", "arm", Some("v6")));
        assert!(!v7.matches("linux", "arm", None));
        for bad in [
            "",
            "linux",
            "linux/",
            "Linux/amd64",
            "linux/amd64/v8/x",
            "linux/am d64",
        ] {
            assert!(bad.parse::<Platform>().is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_list("linux/amd64, linux/arm64/v8").unwrap(),
            vec![amd, v8]
        );
        assert!(parse_list("linux/amd64,bad").is_err());
    }
}
