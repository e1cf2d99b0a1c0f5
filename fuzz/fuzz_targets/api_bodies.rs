//! The three daemons' HTTP request bodies: arbitrary bytes into every body type, with
//! the checks each handler runs before it touches any state. The first byte picks the
//! daemon and route; a panic or an overflow is a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let route = pick >> 2;
    match pick & 3 {
        0 => nbd_server::control::fuzz_request_body(route, body),
        1 => agent::api::vms::fuzz_request_body(route, body),
        2 => agent::api::migration::fuzz_request_body(route, body),
        _ => coordinator::api::fuzz_request_body(route, body),
    }
});
