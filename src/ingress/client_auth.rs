//! Who may use Stowage: client networks per listener, proxy users, mirror users.
//!
//! Proxy users live in an htpasswd-style file (`user:<bcrypt hash>` per line, as written by
//! `htpasswd -B`). bcrypt is deliberately slow, so a verified `Proxy-Authorization` value
//! is remembered (by its SHA-256, never the value) for a few minutes, and only half the
//! cores verify at a time: each check costs tens to hundreds of milliseconds of CPU, and a
//! flood of wrong passwords must queue for those slots, not take every core from the
//! clients being served.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// bcrypt verifications that may run at once.
    slots: Arc<tokio::sync::Semaphore>,
    /// Verifications running now, and the most there have been (for the tests).
    running: AtomicUsize,
    peak: AtomicUsize,
    /// bcrypt verifications run since start.
    runs: AtomicUsize,
}

impl ProxyUsers {
    /// With half the cores (at least one) for bcrypt.
    pub fn load(path: &Path) -> Result<Arc<ProxyUsers>, ConfigError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        ProxyUsers::load_with_slots(path, (cores / 2).max(1))
    }

    /// With `slots` concurrent bcrypt verifications at most.
    pub fn load_with_slots(path: &Path, slots: usize) -> Result<Arc<ProxyUsers>, ConfigError> {
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
            slots: Arc::new(tokio::sync::Semaphore::new(slots.max(1))),
            running: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            runs: AtomicUsize::new(0),
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
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return false;
        };
        // Clients that sent the same value while this one waited (a fleet starting with one
        // account) find it verified now, without a bcrypt run of their own.
        if self.verified.contains_key(&key) {
            return true;
        }
        // The slot goes with the work, not with this future: a client that hangs up while
        // its password is checked does not free a slot for the next one early.
        let users = self.clone();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let running = users.running.fetch_add(1, Ordering::SeqCst) + 1;
            users.peak.fetch_max(running, Ordering::SeqCst);
            users.runs.fetch_add(1, Ordering::Relaxed);
            let ok = bcrypt::verify(password, &hash).unwrap_or(false);
            users.running.fetch_sub(1, Ordering::SeqCst);
            // Remembered before the slot is free, so the next in line finds it.
            if ok {
                users.verified.insert(key, ());
            }
            ok
        })
        .await
        .unwrap_or(false)
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

    fn basic(u: &str, p: &str) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        ))
        .unwrap()
    }

    /// alice with password `s3cret` at bcrypt `cost`, checked in one slot.
    fn alice_in_one_slot(cost: u32) -> (tempfile::TempDir, Arc<ProxyUsers>) {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("users");
        let hash = bcrypt::hash("s3cret", cost).unwrap();
        std::fs::write(&f, format!("alice:{hash}\n")).unwrap();
        let users = ProxyUsers::load_with_slots(&f, 1).unwrap();
        (dir, users)
    }

    /// Checks alice with every one of `passwords` at the same moment.
    async fn all_at_once(users: &Arc<ProxyUsers>, passwords: Vec<String>) -> Vec<bool> {
        let checks: Vec<_> = passwords
            .into_iter()
            .map(|p| {
                let users = users.clone();
                tokio::spawn(async move { users.check(Some(&basic("alice", &p))).await })
            })
            .collect();
        let mut answers = Vec::new();
        for c in checks {
            answers.push(c.await.unwrap());
        }
        answers
    }

    /// A flood of wrong passwords at once: bcrypt (cost 8, ~20 ms each here) runs in one
    /// slot at a time, and every answer is still right; without the slots the 6 checks
    /// run side by side on the blocking pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bcrypt_runs_in_its_slots_only() {
        let (_dir, users) = alice_in_one_slot(8);
        let guesses = (0..6).map(|i| format!("guess{i}")).collect();
        assert_eq!(all_at_once(&users, guesses).await, [false; 6]);
        assert_eq!(users.runs.load(Ordering::SeqCst), 6);
        assert_eq!(users.peak.load(Ordering::SeqCst), 1, "one bcrypt at a time");
    }

    /// Many clients with the same account at once (a fleet starting): one bcrypt run, the
    /// others find the value verified once they get the slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_account_sent_at_once_is_verified_once() {
        let (_dir, users) = alice_in_one_slot(8);
        let same = vec!["s3cret".to_string(); 6];
        assert_eq!(all_at_once(&users, same).await, [true; 6]);
        assert_eq!(users.runs.load(Ordering::SeqCst), 1);
    }

    /// A client that hangs up during its check keeps its slot busy until bcrypt is done:
    /// the next check waits for it instead of running beside it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_check_given_up_holds_its_slot_until_bcrypt_ends() {
        let (_dir, users) = alice_in_one_slot(10);
        for i in 0..3 {
            let guess = basic("alice", &format!("guess{i}"));
            let check = users.check(Some(&guess));
            // Gone long before a cost-10 bcrypt (~80 ms here) is done.
            assert!(tokio::time::timeout(Duration::from_millis(10), check)
                .await
                .is_err());
        }
        assert!(users.check(Some(&basic("alice", "s3cret"))).await);
        assert_eq!(users.peak.load(Ordering::SeqCst), 1, "one bcrypt at a time");
    }
}
