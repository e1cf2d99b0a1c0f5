use super::*;
use crate::contract::BootSpec;
use Command as C;
use ReceiverState as S;
use SwitchoverMode as M;
use proptest::prelude::*;

const MODES: [SwitchoverMode; 2] = [M::Auto, M::Coordinated];
const STATES: [ReceiverState; 9] = [
    S::AwaitHello,
    S::AwaitConfig,
    S::Memory,
    S::Data,
    S::StateReceived,
    S::Verified,
    S::GoAhead,
    S::Running,
    S::Closed,
];

const ALL: [Command; 15] = [
    C::Invalid,
    C::Challenge,
    C::Hello,
    C::Config,
    C::Join,
    C::Memory,
    C::Sync,
    C::State,
    C::Digests,
    C::Complete,
    C::Abandon,
    C::Ok,
    C::Error,
    C::Switchover,
    C::Sparse,
];

#[test]
fn the_documented_sequence_is_accepted() {
    let seq = [
        C::Hello,
        C::Config,
        C::Memory,
        C::Sync,
        C::Sparse,
        C::Memory,
        C::Sync,
        C::State,
        C::Digests,
        C::Complete,
    ];
    let mut s = S::AwaitHello;
    for c in seq {
        s = s.next(c, M::Auto).expect("documented sequence");
    }
    assert_eq!(s, S::Running);
    // Coordinated: the go-ahead sits between Digests and Complete.
    let mut s = S::AwaitHello;
    for c in seq[..9].iter().chain(&[C::Switchover, C::Complete]) {
        s = s.next(*c, M::Coordinated).expect("coordinated sequence");
    }
    assert_eq!(s, S::Running);
    for m in MODES {
        let mut s = S::AwaitHello;
        for c in [C::Hello, C::Join, C::Memory, C::Sync, C::Memory] {
            s = s.next(c, m).expect("data sequence");
        }
        assert_eq!(s, S::Data);
    }
}

#[test]
fn out_of_order_messages_are_refused() {
    // Memory before Config, State twice, Complete before Digests, Digests before State,
    // Join on a control connection, anything after Running.
    for m in MODES {
        assert!(S::AwaitHello.next(C::Config, m).is_err());
        assert!(S::AwaitConfig.next(C::Memory, m).is_err());
        assert!(S::StateReceived.next(C::State, m).is_err());
        assert!(S::StateReceived.next(C::Memory, m).is_err());
        assert!(S::StateReceived.next(C::Sparse, m).is_err());
        assert!(S::AwaitConfig.next(C::Sparse, m).is_err());
        assert!(S::StateReceived.next(C::Complete, m).is_err());
        assert!(S::Memory.next(C::Digests, m).is_err());
        assert!(S::Memory.next(C::Complete, m).is_err());
        assert!(S::Memory.next(C::Join, m).is_err());
        assert!(S::Data.next(C::State, m).is_err());
        // The go-ahead only after the digests matched, once, never on a data stream.
        for s in [
            S::AwaitConfig,
            S::Memory,
            S::StateReceived,
            S::Data,
            S::GoAhead,
        ] {
            assert!(s.next(C::Switchover, m).is_err(), "Switchover in {s:?}");
        }
        assert!(S::GoAhead.next(C::Memory, m).is_err());
        assert!(S::GoAhead.next(C::State, m).is_err());
        for c in ALL {
            assert!(S::Running.next(c, m).is_err(), "{c:?} after Running");
            assert!(S::Closed.next(c, m).is_err(), "{c:?} after Closed");
            // A receiver never accepts response frames or Invalid.
            if matches!(c, C::Invalid | C::Ok | C::Error | C::Challenge) {
                for s in STATES {
                    assert!(s.next(c, m).is_err(), "{c:?} in {s:?}");
                }
            }
        }
    }
    // Coordinated: no Complete without the go-ahead. Auto: no go-ahead at all.
    assert!(S::Verified.next(C::Complete, M::Coordinated).is_err());
    assert!(S::Verified.next(C::Switchover, M::Auto).is_err());
    assert!(S::GoAhead.next(C::Complete, M::Auto).is_err());
}

/// Walks every sequence up to `depth`; returns the commands on each path to Running.
fn paths_to_running(m: SwitchoverMode, depth: usize) -> Vec<Vec<Command>> {
    fn walk(
        s: S,
        m: SwitchoverMode,
        depth: usize,
        path: &mut Vec<Command>,
        out: &mut Vec<Vec<Command>>,
    ) {
        if s == S::Running {
            out.push(path.clone());
            return;
        }
        if depth == 0 {
            return;
        }
        for c in ALL {
            if let Ok(n) = s.next(c, m) {
                path.push(c);
                walk(n, m, depth - 1, path, out);
                path.pop();
            }
        }
    }
    let mut out = Vec::new();
    walk(S::AwaitHello, m, depth, &mut Vec::new(), &mut out);
    out
}

#[test]
fn coordinated_running_needs_the_go_ahead_after_digests() {
    let paths = paths_to_running(M::Coordinated, 8);
    assert!(!paths.is_empty());
    for p in paths {
        let d = p.iter().position(|c| *c == C::Digests).expect("digests");
        let g = p
            .iter()
            .position(|c| *c == C::Switchover)
            .expect("go-ahead");
        assert!(d < g && g + 1 == p.len() - 1, "{p:?}");
        assert_eq!(p.last(), Some(&C::Complete));
    }
    for p in paths_to_running(M::Auto, 8) {
        assert!(!p.contains(&C::Switchover), "{p:?}");
    }
}

proptest! {
    /// Any command sequence: the machine never reaches Running in coordinated mode
    /// unless Digests and then Switchover came, and once Closed or Running it
    /// accepts nothing.
    #[test]
    fn arbitrary_sequences_respect_the_go_ahead(cmds in proptest::collection::vec(0usize..15, 0..24),
                                                coordinated in any::<bool>()) {
        let m = if coordinated { M::Coordinated } else { M::Auto };
        let mut s = S::AwaitHello;
        let (mut digests, mut go_ahead) = (false, false);
        for i in cmds {
            let c = ALL[i];
            match s.next(c, m) {
                Ok(n) => {
                    prop_assert!(!matches!(s, S::Running | S::Closed));
                    if c == C::Digests { digests = true; }
                    if c == C::Switchover {
                        prop_assert!(digests && m == M::Coordinated);
                        go_ahead = true;
                    }
                    if n == S::Running {
                        prop_assert!(digests);
                        prop_assert_eq!(go_ahead, m == M::Coordinated);
                    }
                    s = n;
                }
                Err(e) => prop_assert_eq!(e, OutOfOrder { state: s, cmd: c }),
            }
        }
    }
}

#[test]
fn only_running_is_reached_through_complete_after_digests() {
    // Exhaustive over sequences of length <= 6: Running needs Digests before Complete.
    fn walk(s: S, depth: usize, saw_digests: bool) {
        if s == S::Running {
            assert!(saw_digests);
            return;
        }
        if depth == 0 {
            return;
        }
        for c in ALL {
            if let Ok(n) = s.next(c, M::Auto) {
                walk(n, depth - 1, saw_digests || c == C::Digests);
            }
        }
    }
    walk(S::AwaitHello, 7, false);
}

#[test]
fn before_authentication_only_a_small_hello_passes() {
    for m in MODES {
        assert_eq!(
            S::AwaitHello.max_frame_len(C::Hello, m),
            Ok(C::Hello.max_payload())
        );
        assert!(C::Hello.max_payload() <= HANDSHAKE_MAX_FRAME);
        for c in ALL {
            if c != C::Hello {
                assert!(S::AwaitHello.max_frame_len(c, m).is_err(), "{c:?}");
            }
            // Nothing at all once the connection is over.
            assert!(S::Running.max_frame_len(c, m).is_err());
            assert!(S::Closed.max_frame_len(c, m).is_err());
        }
        // The largest frame a peer can announce is refused from the header.
        let h = protocol::FrameHeader {
            cmd: C::Digests,
            flags: 0,
            length: C::Digests.max_payload(),
        };
        assert!(matches!(
            S::AwaitHello.check_header(&h, m),
            Err(FrameRefused::OutOfOrder(_))
        ));
        let h = protocol::FrameHeader {
            cmd: C::Hello,
            flags: 0,
            length: C::Hello.max_payload() + 1,
        };
        assert!(matches!(
            S::AwaitHello.check_header(&h, m),
            Err(FrameRefused::TooLong { .. })
        ));
    }
}

#[test]
fn authenticated_states_allow_their_commands_full_length() {
    for m in MODES {
        for s in STATES {
            for c in ALL {
                match (s.next(c, m), s.max_frame_len(c, m)) {
                    (Ok(_), Ok(max)) if s.authenticated() => {
                        assert_eq!(max, c.max_payload(), "{c:?} in {s:?}")
                    }
                    (Ok(_), Ok(max)) => assert!(max <= HANDSHAKE_MAX_FRAME),
                    (Err(a), Err(b)) => assert_eq!(a, b),
                    (a, b) => panic!("{c:?} in {s:?}: next {a:?}, max {b:?}"),
                }
            }
        }
    }
    assert_eq!(
        S::Memory.max_frame_len(C::Memory, M::Auto),
        Ok(protocol::MAX_PAYLOAD)
    );
    assert_eq!(S::AwaitConfig.max_frame_len(C::Join, M::Auto), Ok(16));
    assert!(S::Data.max_frame_len(C::Digests, M::Auto).is_err());
}

#[test]
fn abandon_closes_before_running() {
    for m in MODES {
        for s in [
            S::AwaitConfig,
            S::Memory,
            S::Data,
            S::StateReceived,
            S::Verified,
            S::GoAhead,
        ] {
            assert_eq!(s.next(C::Abandon, m), Ok(S::Closed));
        }
    }
}

#[test]
fn config_checks() {
    let spec = VmSpec {
        name: "a".into(),
        memory_mib: 128,
        vcpus: 1,
        boot: BootSpec {
            flat_binary: "x".into(),
            load_addr: 0x7c00,
        },
        disks: vec![],
        cpuid: vec![],
    };
    assert!(check_config(2 << 20, 4, &spec).is_ok());
    assert!(check_config(3 << 20, 4, &spec).is_err());
    assert!(check_config(2 << 20, 0, &spec).is_err());
    assert!(check_config(2 << 20, 65, &spec).is_err());
    assert!(
        check_config(
            2 << 20,
            1,
            &VmSpec {
                memory_mib: 0,
                ..spec.clone()
            }
        )
        .is_err()
    );
    assert!(
        check_config(
            2 << 20,
            1,
            &VmSpec {
                vcpus: 0,
                ..spec.clone()
            }
        )
        .is_err()
    );
}

#[test]
fn tickets_parse() {
    let t = format!("{}.{}", "ab".repeat(16), "cd".repeat(32));
    let (id, secret) = parse_ticket(&t).expect("valid ticket");
    assert_eq!(id, [0xab; 16]);
    assert_eq!(secret, "cd".repeat(32).into_bytes());
    assert!(parse_ticket("abc.def").is_none());
    assert!(parse_ticket(&format!("{}.{}", "zz".repeat(16), "cd".repeat(32))).is_none());
}
