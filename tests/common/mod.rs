//! Hermetic test harness for Stowage's integration tests.
//!
//! Everything runs in the test process on `127.0.0.1:0`: a CA made in the test
//! ([`tls::TestCa`]), a fake registry with a Docker-Hub-like token dance
//! ([`registry::FakeRegistry`]), a fake blob storage host ([`registry::FakeStorage`]),
//! a client that talks through Stowage's `CONNECT` tunnels ([`client::ProxyClient`]) and
//! the Stowage server itself ([`stowage::Stowage`]). Each fake records every request it
//! served, so a test can say "the second pull reached upstream zero times". No fixed
//! ports, no internet, no sleeps for synchronisation except the bounded [`eventually`].
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod registry;
pub mod stowage;
pub mod tls;
pub mod tmpfs;
pub mod util;

use std::time::{Duration, Instant};

pub use client::{pull, Alpn, ProxyClient, Pulled, Resp, Session, Tunnel};
pub use registry::{
    BlobMode, FakeRegistry, FakeStorage, Fault, Gate, Image, Kind, Location, Recorded,
};
pub use stowage::Stowage;
pub use tls::TestCa;
pub use tmpfs::Tmpfs;
pub use util::{
    bounded, cert_names, client_config, counting_server, echo_server, echo_through, files_under,
    metric, BOUND,
};

/// Every host name the fakes answer to; the Stowage fixture pins each to 127.0.0.1.
pub const FAKE_HOSTS: &[&str] = &[
    "registry-1.docker.io",
    "auth.docker.io",
    "quay.io",
    "ghcr.io",
    "gcr.io",
    "registry.example.test",
    "auth.example.test",
    "storage.test",
    "tunnel.test",
];

/// The `User-Agent` the test client sends. Stowage forwards it on the client's behalf, so
/// a fake can tell requests made for a test client from Stowage's own background requests.
pub const TEST_USER_AGENT: &str = "stowage-tests/1";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    format!("sha256:{}", hex::encode(d.as_ref()))
}

/// Deterministic bytes covering every byte value (not UTF-8), distinct per seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after 5 s.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if f() {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after 5s waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Percent-decodes a query component (`+` stays `+`).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `key=value` pairs of a query string, decoded.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}
