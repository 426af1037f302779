//! OCI names, keys and routes (`stowage::oci`, the mirror's router): every parser that
//! turns request text into a type.
//!
//! Asserts, for any UTF-8 input:
//! - `Digest`, `RepoName`, `Tag` accept only their grammar and keep the text exactly (they
//!   become file names and cache keys), and a digest's hex is lowercase hex;
//! - `Host`, `Registry`, `RepoKey`, `TagKey`: `Display` then `FromStr` gives the same value
//!   and the same text again; a registry's URI and authority lead back to it;
//! - `Route::classify`: a blob or manifest route is exactly `/v2/<name>/blobs/<digest>` or
//!   `/v2/<name>/manifests/<reference>` of what it names;
//! - the mirror's router (`ns=`, path prefixes): `ns` never reaches upstream, a registry
//!   other than the default is one `known` allowed, the path it routes to is a valid URI.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stowage::ingress::mirror;
use stowage::oci::{Digest, Host, Reference, Registry, RepoKey, RepoName, Route, Tag, TagKey};

fn lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn names(s: &str) {
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s);
        assert!(d.hex().bytes().all(lower_hex), "{d}");
        assert!(matches!(d.hex().len(), 64 | 128));
    }
    if let Ok(n) = s.parse::<RepoName>() {
        assert_eq!(n.as_str(), s);
        assert!(n.as_str().len() <= 255);
        assert!(n
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)));
        assert!(n
            .as_str()
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".."));
    }
    if let Ok(t) = s.parse::<Tag>() {
        assert_eq!(t.as_str(), s);
        assert!(!t.as_str().contains(['/', ':', '@']));
    }
}

fn registries(s: &str) {
    if let Ok(h) = Host::parse(s) {
        let again = Host::parse(h.as_str()).expect("a normal host parses again");
        assert_eq!(again, h);
        assert!(h
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-:".contains(&b)));
    }
    for r in [s.parse::<Registry>(), Registry::from_reference_domain(s)]
        .into_iter()
        .flatten()
    {
        let shown = r.to_string();
        let back: Registry = shown.parse().expect("Display form parses");
        assert_eq!(back, r, "{shown}");
        assert_eq!(back.to_string(), shown);
        assert_eq!(
            Registry::from_authority(r.scheme(), &r.authority()).expect("own authority"),
            r
        );
        let uri = r.uri("/v2/").expect("a registry is a valid origin");
        assert_eq!(Registry::of_uri(&uri).as_ref(), Some(&r), "{uri}");
        assert!(r.port() != 0);
    }
    if let Ok(k) = s.parse::<RepoKey>() {
        let shown = k.to_string();
        assert_eq!(shown.parse::<RepoKey>().expect("RepoKey Display parses"), k);
    }
    if let Ok(k) = s.parse::<TagKey>() {
        let shown = k.to_string();
        assert_eq!(shown.parse::<TagKey>().expect("TagKey Display parses"), k);
        assert_eq!(shown.parse::<TagKey>().unwrap().to_string(), shown);
    }
}

fn routes(s: &str) {
    match Route::classify(s) {
        Route::Blob { name, digest } => {
            assert_eq!(format!("/v2/{name}/blobs/{digest}"), s);
        }
        Route::Manifest { name, reference } => {
            let r = match &reference {
                Reference::Digest(d) => d.to_string(),
                Reference::Tag(t) => t.as_str().to_owned(),
            };
            assert_eq!(format!("/v2/{name}/manifests/{r}"), s);
        }
        Route::Other => {}
    }
}

fn mirror_route(s: &str) {
    let Ok(uri) = s.parse::<http::Uri>() else {
        return;
    };
    let default: Registry = "registry-1.docker.io".parse().unwrap();
    let known = |h: &Host| {
        ["registry-1.docker.io", "quay.io", "ghcr.io", "127.0.0.1"].contains(&h.as_str())
    };
    if let Ok(routed) = mirror::route(&uri, &default, known) {
        assert!(routed.registry.is_https());
        if routed.registry != default {
            assert!(known(routed.registry.host()), "{:?}", routed.registry);
        }
        let pq = &routed.path_and_query;
        if let Some((_, query)) = pq.split_once('?') {
            assert!(
                query.split('&').all(|p| !p.starts_with("ns=")),
                "ns= went upstream: {pq}"
            );
        }
        // The mirror refuses (400) a routed path that is not a URI; when the input path was
        // one, the routed path must be one too.
        if uri.path().starts_with('/') {
            assert!(pq.parse::<http::Uri>().is_ok(), "{pq:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    names(s);
    registries(s);
    routes(s);
    mirror_route(s);
});
