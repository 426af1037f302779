//! Validated names from the OCI distribution API: digests, repository names, tags.
//!
//! A `Digest` is `algorithm:hex` with the exact hex length of its algorithm, so its parts
//! are safe to use as file names; a `RepoName` follows the distribution spec's grammar
//! (lowercase components, no `..`). Nothing reaches a file path or a cache key unparsed.

use std::fmt;
use std::str::FromStr;

/// Hash algorithms a digest may name. Only these reach the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A content digest, `sha256:<64 lowercase hex>` or `sha512:<128 lowercase hex>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: std::sync::Arc<str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("digest must look like sha256:<64 hex digits>")]
    Digest,
    #[error("repository name is not valid: lowercase [a-z0-9] components separated by '/', '.', '_', '__' or '-'")]
    Name,
    #[error("tag must match [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}")]
    Tag,
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex part; safe as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Builds a digest from raw hash output.
    pub fn from_bytes(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        Digest {
            algorithm,
            hex: hex::encode(bytes).into(),
        }
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s.split_once(':').ok_or(ParseError::Digest)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(ParseError::Digest),
        };
        let valid = hex.len() == algorithm.hex_len()
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(ParseError::Digest);
        }
        Ok(Digest {
            algorithm,
            hex: hex.into(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A repository name such as `library/alpine`, validated against the distribution grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most 255 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(std::sync::Arc<str>);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl FromStr for RepoName {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 255 || !s.split('/').all(valid_component) {
            return Err(ParseError::Name);
        }
        Ok(RepoName(s.into()))
    }
}

/// A tag, `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(std::sync::Arc<str>);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
        let valid = !b.is_empty()
            && b.len() <= 128
            && word(b[0])
            && b.iter().all(|&x| word(x) || x == b'.' || x == b'-');
        if valid {
            Ok(Tag(s.into()))
        } else {
            Err(ParseError::Tag)
        }
    }
}

/// What a manifest request names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Digest(Digest),
    Tag(Tag),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Digest(d) => d.fmt(f),
            Reference::Tag(t) => f.write_str(t.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn digests_parse_strictly() {
        let d: Digest = format!("sha256:{HEX}").parse().unwrap();
        assert_eq!(d.hex(), HEX);
        assert_eq!(d.to_string(), format!("sha256:{HEX}"));
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", &HEX[1..]),
            format!("sha256:{HEX}0"),
            format!("sha256:{}", HEX.to_uppercase()),
            format!("md5:{HEX}"),
            format!("sha256:../{}", &HEX[3..]),
            HEX.to_string(),
            format!("sha512:{HEX}"),
        ] {
            assert_eq!(bad.parse::<Digest>(), Err(ParseError::Digest), "{bad}");
        }
        assert!(format!("sha512:{HEX}{HEX}").parse::<Digest>().is_ok());
    }

    #[test]
    fn names_follow_the_grammar() {
        for good in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-org/my__img",
            "x.y/z-1",
            "a--b",
        ] {
            assert!(good.parse::<RepoName>().is_ok(), "{good}");
        }
        for bad in [
            "",
            "Library/alpine",
            "a/../b",
            "..",
            "a//b",
            "/a",
            "a/",
            "a_-b",
            "a___b",
            "-a",
            "a.",
            "a/%2e%2e",
        ] {
            assert_eq!(bad.parse::<RepoName>(), Err(ParseError::Name), "{bad}");
        }
        assert!("a".repeat(256).parse::<RepoName>().is_err());
    }

    #[test]
    fn tags_follow_the_grammar() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("v1.2.3-rc_1".parse::<Tag>().is_ok());
        assert!(".hidden".parse::<Tag>().is_err());
        assert!("a/b".parse::<Tag>().is_err());
        assert!("a".repeat(129).parse::<Tag>().is_err());
    }
}
