//! Replies as the client parses them: option replies, reply headers, chunk payloads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::{ChunkPayload, OptionReply, ReplyHeader};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let t = u16::from_be_bytes([data[0], data[1]]);
    let rest = &data[2..];
    let _ = ChunkPayload::decode(t % 8, rest, rest.len() as u64);
    let _ = ChunkPayload::decode(t, rest, rest.len() as u64);
    let _ = OptionReply::decode(u32::from(t % 5) | (u32::from(data[2] & 0x80) << 24), rest);
    let _ = ReplyHeader::decode(rest);
});
