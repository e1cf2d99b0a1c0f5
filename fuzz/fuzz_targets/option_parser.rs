//! Handshake options as the server parses them: header, then payload by option.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::{ClientOption, OPTION_HEADER_LEN, OptionHeader};

fuzz_target!(|data: &[u8]| {
    if data.len() >= OPTION_HEADER_LEN {
        let _ = OptionHeader::decode(&data[..OPTION_HEADER_LEN]);
    }
    if let Some((&op, rest)) = data.split_first() {
        // Known options are 1..=11; bias towards them.
        if let Ok(opt) = ClientOption::decode(u32::from(op % 16), rest) {
            // Whatever decodes must encode and decode to the same value.
            let mut out = Vec::new();
            opt.encode(&mut out);
            let again =
                ClientOption::decode(opt.code(), &out[OPTION_HEADER_LEN..]).expect("re-decode");
            assert_eq!(again, opt);
        }
    }
});
