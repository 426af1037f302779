//! The request path through the mirror listener (plain HTTP, `default_registry = "registry.fuzz"`): the input is everything a client
//! sends on one connection (HTTP/1.1 or h2 prior knowledge, with `?ns=`, registry path
//! prefixes or neither, as containerd, CRI-O and dockerd send them).
//! What is asserted is in `common/mod.rs`: no panic, no cached object that does not hash
//! to its name, no private content to a client without the private account, no
//! connection or task that outlives its client.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use stowage::ingress::Listener;

fuzz_target!(|data: &[u8]| {
    common::harness().run(Listener::Mirror, data);
});
