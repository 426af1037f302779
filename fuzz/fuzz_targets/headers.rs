//! Header parsers: `WWW-Authenticate` (upstream token auth), `Range`, `Accept`, hosts and
//! authorities, and the percent-decoding `ns=` goes through.
//!
//! The input is `<8 bytes: content length><header text>`. Asserts:
//! - `parse_bearer`: a parsed challenge, written back with every value quoted, parses to
//!   the same challenge;
//! - `parse_range`: a satisfiable range lies inside the content and is not empty; an
//!   unsatisfiable one is a well-formed `bytes=` range;
//! - `accept_key`: normalising its own output changes nothing;
//! - `percent_decode` agrees with a strict reference decoder (`%` then two hex digits);
//! - `Registry::from_authority` / `Host::parse`: no panic, and what parses round-trips.
#![no_main]

use http::header::ACCEPT;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use stowage::http_util::percent_decode;
use stowage::oci::{Registry, Scheme};
use stowage::registry_api::manifests::{accept_key, is_manifest_type};
use stowage::registry_api::{parse_range, ServeError};
use stowage::upstream::token_auth::{parse_bearer, Challenge};

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn bearer(s: &str) {
    let Some(c) = parse_bearer(s) else {
        return;
    };
    let mut text = format!("Bearer realm={}", quote(&c.realm));
    if let Some(v) = &c.service {
        text.push_str(&format!(",service={}", quote(v)));
    }
    if let Some(v) = &c.scope {
        text.push_str(&format!(", scope={}", quote(v)));
    }
    let again: Option<Challenge> = parse_bearer(&text);
    assert_eq!(again.as_ref(), Some(&c), "{text:?}");
}

fn range(value: &[u8], len: u64) {
    let Ok(v) = HeaderValue::from_bytes(value) else {
        return;
    };
    match parse_range(Some(&v), len) {
        Some(Ok((start, end))) => {
            assert!(start < end, "{v:?} {len}: {start}..{end}");
            assert!(end <= len, "{v:?} {len}: {start}..{end}");
        }
        Some(Err(ServeError::RangeNotSatisfiable { len: l })) => {
            assert_eq!(l, len);
            assert!(v.to_str().unwrap().trim().starts_with("bytes="));
        }
        Some(Err(e)) => panic!("unexpected range error {e:?}"),
        None => {}
    }
}

fn accept(s: &str) {
    let mut h = HeaderMap::new();
    for line in s.split('\n') {
        if let Ok(v) = HeaderValue::from_str(line) {
            h.append(ACCEPT, v);
        }
    }
    let key = accept_key(&h);
    let mut again = HeaderMap::new();
    if !key.is_empty() {
        again.insert(
            ACCEPT,
            HeaderValue::from_str(&key).expect("a key is a header value"),
        );
    }
    assert_eq!(accept_key(&again), key);
    for t in key.split(',') {
        let _ = is_manifest_type(t);
    }
    let _ = is_manifest_type(s);
}

/// `%XX` with two hex digits, `+` as a space, the result UTF-8.
fn strict_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = b.get(i + 1..i + 3)?;
                if !h.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn authority(s: &str) {
    assert_eq!(percent_decode(s), strict_decode(s), "{s:?}");
    for scheme in [Scheme::Https, Scheme::Http] {
        if let Ok(r) = Registry::from_authority(scheme, s) {
            assert_eq!(r.scheme(), scheme);
            assert_eq!(Registry::from_authority(scheme, &r.authority()).unwrap(), r);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (len, rest) = data.split_at(8);
    let len = u64::from_le_bytes(len.try_into().unwrap());
    // Small lengths are where off-by-one errors live; keep most of them small.
    let len = if len & 1 == 0 {
        len >> 1
    } else {
        (len >> 1) % 4096
    };
    range(rest, len);
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    bearer(s);
    accept(s);
    authority(s);
});
