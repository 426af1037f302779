//! The configuration loader: `Config::from_toml_str` (parse + `validate`).
//!
//! Asserts no panic, and that a configuration that validates can be used the way
//! `Server::bind` uses it without panicking: every listener address, registry, auth host,
//! TTL rule and default registry that `validate` let through is read with the `expect`s
//! of the composition root, and every duration it holds can serve as a deadline and a
//! cache TTL (`Instant + d`; moka refuses TTLs over 1000 years).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use stowage::oci::Registry;
use stowage::settings::Config;

/// moka's limit for `time_to_live`; hyper and tokio add durations to `Instant::now()`.
const MOKA_MAX: Duration = Duration::from_secs(1000 * 365 * 24 * 3600);

fn usable(name: &str, d: Duration) {
    assert!(d <= MOKA_MAX, "{name} = {d:?} passed validation");
    assert!(
        Instant::now().checked_add(d).is_some(),
        "{name} = {d:?} overflows a deadline"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml_str(text) else {
        return;
    };
    config.proxy_listen().expect("validated proxy.listen");
    config.mirror_listen().expect("validated mirror.listen");
    config.direct_listen().expect("validated direct.listen");
    Registry::from_reference_domain(&config.mirror.default_registry)
        .expect("validated default_registry");
    for r in config.registries() {
        let reg = r.registry();
        let _ = r.auth_origins();
        let _ = r.inject();
        assert_eq!(reg.to_string().parse::<Registry>().as_ref(), Ok(&reg));
    }
    let ttls = config.tag_ttls();
    let hub: Registry = "registry-1.docker.io".parse().unwrap();
    usable("tag ttl", ttls.ttl(&hub, "latest"));
    for (_, _, d) in &ttls.rules {
        usable("cache.ttl", *d);
    }
    for d in ttls.per_registry.values() {
        usable("registry.manifest_ttl", *d);
    }
    for (name, d) in [
        ("proxy.idle_timeout", config.proxy.idle_timeout.0),
        ("proxy.header_timeout", config.proxy.header_timeout.0),
        ("proxy.shutdown_grace", config.proxy.shutdown_grace.0),
        ("cache.manifest_ttl", config.cache.manifest_ttl.0),
        ("cache.auth_ttl", config.cache.auth_ttl.0),
        ("cache.public_ttl", config.cache.public_ttl.0),
        (
            "upstream.connect_timeout",
            config.upstream.connect_timeout.0,
        ),
        (
            "upstream.response_timeout",
            config.upstream.response_timeout.0,
        ),
        ("upstream.idle_timeout", config.upstream.idle_timeout.0),
        ("upstream.dns_ttl", config.upstream.dns_ttl.0),
    ] {
        usable(name, d);
    }
});
