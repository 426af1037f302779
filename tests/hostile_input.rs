//! Property tests ("fuzzing" on stable Rust) for everything that parses input from the
//! network or from users: the request classifier, digest/name/tag parsers, `Range`,
//! Bearer challenges, mirror routing and the config loader. None may panic; accepted
//! input must be safe to use as a path or cache key; rejected input gets an error.
//!
//! `PROPTEST_CASES` raises the case count for long runs (see README, "Hostile input").

use proptest::prelude::*;
use stowage::oci::{Digest, RepoName, Route, Tag};

fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    ProptestConfig {
        cases: n,
        ..ProptestConfig::default()
    }
}

/// Strings biased towards the shapes that matter: path separators, dots, digests.
fn pathish() -> impl Strategy<Value = String> {
    let atoms = prop_oneof![
        Just("/".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just("%2e".to_string()),
        Just("v2".to_string()),
        Just("blobs".to_string()),
        Just("manifests".to_string()),
        Just("sha256:".to_string()),
        Just("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".to_string()),
        "[a-zA-Z0-9._-]{0,12}",
        any::<String>(),
    ];
    prop::collection::vec(atoms, 0..12).prop_map(|v| v.concat())
}

fn assert_safe_name(s: &str) {
    assert!(!s.contains(".."), "{s}");
    assert!(!s.contains("//"), "{s}");
    assert!(!s.starts_with('/') && !s.ends_with('/'), "{s}");
    assert!(
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)),
        "{s}"
    );
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn classifier_never_panics_and_only_accepts_safe_parts(path in pathish()) {
        match Route::classify(&path) {
            Route::Blob { name, digest } => {
                assert_safe_name(name.as_str());
                prop_assert!(digest.hex().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
                prop_assert_eq!(digest.to_string().parse::<Digest>().unwrap(), digest);
            }
            Route::Manifest { name, .. } => assert_safe_name(name.as_str()),
            Route::Other => {}
        }
    }

    #[test]
    fn digests_round_trip_or_are_rejected(s in pathish()) {
        if let Ok(d) = s.parse::<Digest>() {
            prop_assert_eq!(d.to_string(), s);
            prop_assert!(!d.hex().contains('/') && !d.hex().contains('.'));
        }
    }

    #[test]
    fn names_and_tags_are_safe(s in pathish()) {
        if let Ok(n) = s.parse::<RepoName>() {
            assert_safe_name(n.as_str());
        }
        if let Ok(t) = s.parse::<Tag>() {
            prop_assert!(!t.as_str().contains('/') && !t.as_str().starts_with('.'));
        }
    }

    #[test]
    fn ranges_stay_inside_the_content(spec in "(bytes=)?[0-9-, ]{0,24}|[ -~]{0,30}", len in 0u64..1_000_000) {
        let h = http::HeaderValue::from_str(&spec);
        if let Ok(h) = h {
            if let Some(Ok((start, end))) = stowage::registry_api::parse_range(Some(&h), len) {
                prop_assert!(start < end && end <= len, "{} {} {}", spec, start, end);
            }
        }
    }

    #[test]
    fn bearer_challenges_never_panic(s in any::<String>()) {
        if let Some(c) = stowage::upstream::token_auth::parse_bearer(&s) {
            prop_assert!(s.to_ascii_lowercase().contains("realm"));
            let _ = c;
        }
    }

    #[test]
    fn mirror_routing_never_panics_and_names_valid_hosts(path in pathish(), ns in "[ -~]{0,20}") {
        let uri = format!("/v2/{}?ns={}", path.trim_start_matches('/'), ns);
        if let Ok(uri) = uri.parse::<http::Uri>() {
            if let Ok(r) = stowage::ingress::mirror::route(&uri, &"registry-1.docker.io".parse().unwrap(), |_| true) {
                let shown = r.registry.to_string();
                prop_assert_eq!(shown.parse::<stowage::oci::Registry>().ok(), Some(r.registry.clone()), "{}", shown);
                prop_assert!(r.path_and_query.starts_with("/v2/"));
                let query = r.path_and_query.split_once('?').map(|(_, q)| q).unwrap_or("");
                prop_assert!(query.split('&').all(|p| p.split_once('=').map(|(k, _)| k) != Some("ns")), "{}", r.path_and_query);
            }
        }
    }

    #[test]
    fn config_loader_never_panics(text in any::<String>()) {
        if let Err(e) = stowage::Config::from_toml_str(&text) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn config_loader_on_tomlish_input(
        section in prop_oneof![Just("proxy"), Just("cache"), Just("upstream"), Just("mirror"), Just("ca"), Just("x")],
        key in "[a-z_]{1,16}",
        value in prop_oneof![Just("\"10m\"".to_string()), Just("\"50GiB\"".to_string()), Just("-1".to_string()), Just("[\"::1/200\"]".to_string()), "\"[ -~]{0,12}\"", "[0-9]{1,25}"],
    ) {
        let text = format!("[{section}]\n{key} = {value}\n");
        if let Err(e) = stowage::Config::from_toml_str(&text) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
