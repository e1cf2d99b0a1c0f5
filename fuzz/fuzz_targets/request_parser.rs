//! Transmission requests, compact and extended.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::Request;

fuzz_target!(|data: &[u8]| {
    for extended in [false, true] {
        if let Ok(req) = Request::decode(data, extended) {
            let mut out = Vec::new();
            req.encode(extended, &mut out);
            assert_eq!(&out[..], data);
            let _ = req.payload_len(extended);
        }
    }
});
