//! The agent's migration receiver: frame headers checked against the protocol state
//! (before any allocation), then the payload decoders, in every state and mode.
//!
//! Input: one byte choosing the start state and switchover mode, then frames (a
//! 16-byte header and as much payload as it declares, cut short by the input's end).
#![no_main]

use agent::migration::protocol::SwitchoverMode;
use agent::migration::protocol::{
    Command, FrameHeader, HEADER_LEN, Message, parse_memory, parse_sparse,
};
use agent::migration::receiver::{HANDSHAKE_MAX_FRAME, ReceiverState};
use libfuzzer_sys::fuzz_target;

const STATES: [ReceiverState; 9] = [
    ReceiverState::AwaitHello,
    ReceiverState::AwaitConfig,
    ReceiverState::Memory,
    ReceiverState::Data,
    ReceiverState::StateReceived,
    ReceiverState::Verified,
    ReceiverState::GoAhead,
    ReceiverState::Running,
    ReceiverState::Closed,
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mut rest)) = data.split_first() else {
        return;
    };
    let mut state = STATES[usize::from(sel) % STATES.len()];
    let mode = if sel & 0x80 != 0 {
        SwitchoverMode::Coordinated
    } else {
        SwitchoverMode::Auto
    };
    while rest.len() >= HEADER_LEN {
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&rest[..HEADER_LEN]);
        rest = &rest[HEADER_LEN..];
        let Ok(h) = FrameHeader::parse(&hdr) else {
            return;
        };
        // Every state judges the header the same way the pure function says.
        for s in STATES {
            if let Ok(max) = s.max_frame_len(h.cmd, mode) {
                assert!(s.authenticated() || max <= HANDSHAKE_MAX_FRAME);
                assert!(max <= h.cmd.max_payload());
                assert_eq!(s.check_header(&h, mode).is_ok(), h.length <= max);
            } else {
                assert!(s.check_header(&h, mode).is_err());
            }
        }
        if state.check_header(&h, mode).is_err() {
            return;
        }
        let n = usize::try_from(h.length)
            .unwrap_or(usize::MAX)
            .min(rest.len());
        let (payload, tail) = rest.split_at(n);
        rest = tail;
        let decoded = Message::decode(&h, payload);
        match h.cmd {
            Command::Memory => {
                let mut d = Vec::new();
                let fast = parse_memory(&h, payload, &mut d);
                assert_eq!(fast.is_ok(), decoded.is_ok());
            }
            Command::Sparse => {
                let fast = parse_sparse(&h, payload, |_, _| {});
                assert_eq!(fast.is_ok(), decoded.is_ok());
            }
            _ => {}
        }
        if let Ok(m) = &decoded {
            assert_eq!(m.command(), h.cmd);
        }
        match state.next(h.cmd, mode) {
            Ok(next) => state = next,
            Err(_) => return,
        }
    }
});
