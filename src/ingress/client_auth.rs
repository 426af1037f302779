//! Who may use Stowage: client networks per listener, proxy users, mirror users.
//!
//! Proxy users live in an htpasswd-style file (`user:<bcrypt hash>` per line, as written by
//! `htpasswd -B`). bcrypt is deliberately slow, so a verified `Proxy-Authorization` value
//! is remembered (by its SHA-256, never the value) for a few minutes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::HeaderValue;

use crate::settings::ConfigError;

/// Whether `ip` is inside one of `allow`; an empty list allows everyone. IPv4-mapped IPv6
/// peers (dual-stack listeners) are matched as IPv4.
pub fn allowed(allow: &[ipnet::IpNet], ip: IpAddr) -> bool {
    if allow.is_empty() {
        return true;
    }
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    allow.iter().any(|net| net.contains(&ip))
}

/// Whether a mirror request carries one of the mirror's accounts (or the mirror is open).
/// Compared in constant time.
pub fn mirror_user_ok(users: &[crate::settings::Credentials], headers: &http::HeaderMap) -> bool {
    if users.is_empty() {
        return true;
    }
    headers
        .get(http::header::AUTHORIZATION)
        .is_some_and(|given| {
            users
                .iter()
                .any(|u| constant_time_eq(u.basic().as_bytes(), given.as_bytes()))
        })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub struct ProxyUsers {
    users: HashMap<String, String>,
    verified: moka::sync::Cache<[u8; 32], ()>,
}

impl ProxyUsers {
    pub fn load(path: &Path) -> Result<Arc<ProxyUsers>, ConfigError> {
        let bad = |m: String| ConfigError::Invalid {
            key: "proxy.users_file".into(),
            message: m,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("line {}: expected user:hash", n + 1)))?;
            if !hash.starts_with("$2") {
                return Err(bad(format!(
                    "line {}: only bcrypt hashes are accepted (htpasswd -B)",
                    n + 1
                )));
            }
            users.insert(user.to_owned(), hash.to_owned());
        }
        if users.is_empty() {
            return Err(bad(format!("{} holds no users", path.display())));
        }
        Ok(Arc::new(ProxyUsers {
            users,
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
        }))
    }

    /// Checks a `Proxy-Authorization: Basic ...` value.
    pub async fn check(self: &Arc<Self>, header: Option<&HeaderValue>) -> bool {
        let Some(value) = header else { return false };
        let key: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value.as_bytes())
            .as_ref()
            .try_into()
            .expect("32 bytes");
        if self.verified.contains_key(&key) {
            return true;
        }
        let Some((user, password)) = decode_basic(value) else {
            return false;
        };
        let Some(hash) = self.users.get(&user).cloned() else {
            return false;
        };
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if ok {
            self.verified.insert(key, ());
        }
        ok
    }
}

fn decode_basic(value: &HeaderValue) -> Option<(String, String)> {
    let s = value.to_str().ok()?;
    let (scheme, b64) = s.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (u, p) = raw.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists() {
        let nets: Vec<ipnet::IpNet> =
            vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(allowed(&nets, "10.9.8.7".parse().unwrap()));
        assert!(allowed(&nets, "::ffff:10.1.1.1".parse().unwrap()));
        assert!(allowed(&nets, "::1".parse().unwrap()));
        assert!(!allowed(&nets, "192.168.1.1".parse().unwrap()));
        assert!(allowed(&[], "192.168.1.1".parse().unwrap()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proxy_users_are_checked_against_bcrypt_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("users");
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        std::fs::write(&f, format!("# comment\nalice:{hash}\n")).unwrap();
        let users = ProxyUsers::load(&f).unwrap();
        let basic = |u: &str, p: &str| {
            HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            ))
            .unwrap()
        };
        assert!(users.check(Some(&basic("alice", "s3cret"))).await);
        assert!(users.check(Some(&basic("alice", "s3cret"))).await);
        assert!(!users.check(Some(&basic("alice", "wrong"))).await);
        assert!(!users.check(Some(&basic("bob", "s3cret"))).await);
        assert!(!users.check(None).await);
        assert!(
            !users
                .check(Some(&HeaderValue::from_static("Bearer x")))
                .await
        );
        std::fs::write(&f, "alice:plaintext\n").unwrap();
        assert!(ProxyUsers::load(&f)
            .err()
            .unwrap()
            .to_string()
            .contains("bcrypt"));
    }
}
