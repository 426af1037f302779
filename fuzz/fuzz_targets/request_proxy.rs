//! The request path through the forward-proxy listener: the input is everything a client
//! sends on one plain connection (HTTP/1.1, h2 prior knowledge, `CONNECT` then whatever
//! follows, absolute-form `http://` requests to the plain-HTTP registry `plain.fuzz`).
//! What is asserted is in `common/mod.rs`: no panic, no cached object that does not hash
//! to its name, no private content to a client without the private account, no
//! connection or task that outlives its client.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use stowage::ingress::Listener;

fuzz_target!(|data: &[u8]| {
    common::harness().run(Listener::Proxy, data);
});
