use super::*;
use crate::contract::{BootSpec, DiskSpec, VmSpec};
use proptest::prelude::*;
use stagehand_common::secret::Secret;

fn spec() -> VmSpec {
    VmSpec {
        name: "vm7".into(),
        memory_mib: 150,
        vcpus: 1,
        boot: BootSpec {
            flat_binary: "/x/ab.bin".into(),
            load_addr: 0x7c00,
        },
        disks: vec![],
        cpuid: vec![[0, 0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]],
    }
}

fn roundtrip(m: &Message, c: Compression) -> Message {
    let bytes = m.encode(c);
    let mut hdr = [0u8; HEADER_LEN];
    hdr.copy_from_slice(&bytes[..HEADER_LEN]);
    let h = FrameHeader::parse(&hdr).expect("header parses");
    assert_eq!(h.length as usize, bytes.len() - HEADER_LEN);
    Message::decode(&h, &bytes[HEADER_LEN..]).expect("payload decodes")
}

fn samples() -> Vec<Message> {
    vec![
        Message::Challenge {
            version_min: 1,
            version_max: 1,
            nonce: [7; 32],
        },
        Message::Hello {
            version: 1,
            auth: AuthKind::Token,
            nonce: [1; 32],
            proof: [2; 32],
        },
        Message::Hello {
            version: 1,
            auth: AuthKind::Ticket([9; 16]),
            nonce: [1; 32],
            proof: [2; 32],
        },
        Message::Config {
            chunk_size: 2 << 20,
            streams: 4,
            switchover: SwitchoverMode::Auto,
            switchover_timeout_s: 30,
            spec: spec(),
        },
        Message::Config {
            chunk_size: 2 << 20,
            streams: 1,
            switchover: SwitchoverMode::Coordinated,
            switchover_timeout_s: u32::MAX,
            spec: spec(),
        },
        Message::Sparse { pages: vec![] },
        Message::Sparse {
            pages: vec![
                SparsePage {
                    gpa: 0x10_0000,
                    words: vec![(0, 0x42)],
                },
                SparsePage {
                    gpa: 0x20_0000,
                    words: vec![],
                },
                SparsePage {
                    gpa: 0x3000,
                    words: vec![(3, u64::MAX), (511, 1)],
                },
            ],
        },
        Message::Switchover { disks: vec![] },
        Message::Switchover {
            disks: vec![
                DiskSpec {
                    nbd: "nbd://10.0.0.2:10809/vm7-root".into(),
                    lease: Some(Secret::new("abc").expect("token")),
                },
                DiskSpec::plain("nbd+unix:///d2?socket=/run/s"),
            ],
        },
        Message::Join { session: [5; 16] },
        Message::Memory {
            ranges: vec![
                MemRange {
                    gpa: 0x1000,
                    len: 0x2000,
                },
                MemRange {
                    gpa: 0x10_0000,
                    len: 0x1000,
                },
            ],
            data: (0..0x3000u32).map(|i| (i % 251) as u8).collect(),
        },
        Message::Sync { pass: 3 },
        Message::State {
            state: vec![1, 2, 3, 4],
        },
        Message::Digests {
            chunk_size: 2 << 20,
            digests: vec![[3; 32], [4; 32]],
        },
        Message::Complete,
        Message::Abandon {
            reason: "cancelled by operator".into(),
        },
        Message::Ok { payload: vec![] },
        Message::Error {
            code: ErrorCode::DigestMismatch,
            message: "chunk 3 differs".into(),
        },
    ]
}

#[test]
fn every_message_round_trips_with_every_compression() {
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        for m in samples() {
            assert_eq!(roundtrip(&m, c), m, "{c}");
        }
    }
}

#[test]
fn compression_shrinks_repetitive_pages_and_sets_flag() {
    let m = Message::Memory {
        ranges: vec![MemRange {
            gpa: 0,
            len: 1 << 20,
        }],
        data: vec![1; 1 << 20],
    };
    for c in [Compression::Lz4, Compression::Zstd] {
        let b = m.encode(c);
        assert!(b.len() < 64 << 10, "{c}: {}", b.len());
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), c.flag());
    }
}

#[test]
fn header_rejects_zero_command_reserved_and_oversize() {
    let zero = [0u8; HEADER_LEN];
    assert_eq!(
        FrameHeader::parse(&zero),
        Err(ProtocolError::UnknownCommand(0))
    );
    let mut h = FrameHeader {
        cmd: Command::Sync,
        flags: 0,
        length: 4,
    }
    .encode();
    h[5] = 1;
    assert_eq!(FrameHeader::parse(&h), Err(ProtocolError::Reserved));
    let h = FrameHeader {
        cmd: Command::Memory,
        flags: 0,
        length: MAX_PAYLOAD + 1,
    }
    .encode();
    assert!(matches!(
        FrameHeader::parse(&h),
        Err(ProtocolError::TooLong { .. })
    ));
    let h = FrameHeader {
        cmd: Command::Sync,
        flags: 1,
        length: 4,
    }
    .encode();
    assert_eq!(FrameHeader::parse(&h), Err(ProtocolError::BadFlags(1)));
}

#[test]
fn memory_ranges_must_be_aligned_and_match_data() {
    let bad = Message::Memory {
        ranges: vec![MemRange {
            gpa: 0x10,
            len: 0x1000,
        }],
        data: vec![0; 0x1000],
    };
    let b = bad.encode(Compression::None);
    let mut hdr = [0u8; HEADER_LEN];
    hdr.copy_from_slice(&b[..HEADER_LEN]);
    let h = FrameHeader::parse(&hdr).expect("header ok");
    assert!(matches!(
        Message::decode(&h, &b[HEADER_LEN..]),
        Err(ProtocolError::BadRange { .. })
    ));
    // Data shorter than the ranges claim.
    let short = Message::Memory {
        ranges: vec![MemRange {
            gpa: 0,
            len: 0x2000,
        }],
        data: vec![0; 0x1000],
    };
    let b = short.encode(Compression::None);
    hdr.copy_from_slice(&b[..HEADER_LEN]);
    let h = FrameHeader::parse(&hdr).expect("header ok");
    assert_eq!(
        Message::decode(&h, &b[HEADER_LEN..]),
        Err(ProtocolError::BadLength(Command::Memory))
    );
}

#[test]
fn prefix_plus_bytes_equals_encode_and_parses_without_copy() {
    let ranges = vec![
        MemRange {
            gpa: 0x2000,
            len: 0x1000,
        },
        MemRange {
            gpa: 0x8000,
            len: 0x2000,
        },
    ];
    let data: Vec<u8> = (0..0x3000u32).map(|i| (i * 7) as u8).collect();
    let mut frame = memory_frame_prefix(&ranges, data.len() as u64);
    frame.extend_from_slice(&data);
    let m = Message::Memory {
        ranges: ranges.clone(),
        data: data.clone(),
    };
    assert_eq!(frame, m.encode(Compression::None));
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let b = m.encode(c);
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&b[..HEADER_LEN]);
        let h = FrameHeader::parse(&hdr).expect("header");
        let mut d = Vec::new();
        let (r, bytes) = parse_memory(&h, &b[HEADER_LEN..], &mut d).expect("parses");
        assert_eq!((r, bytes), (ranges.clone(), &data[..]));
    }
}

#[test]
fn compressed_payload_declaring_huge_size_is_refused_before_allocating() {
    let mut p = u32::MAX.to_le_bytes().to_vec();
    p.extend_from_slice(&[0; 16]);
    let h = FrameHeader {
        cmd: Command::Memory,
        flags: 1,
        length: p.len() as u64,
    };
    assert!(matches!(
        Message::decode(&h, &p),
        Err(ProtocolError::TooLong { .. })
    ));
}

#[test]
fn auth_proofs_depend_on_key_role_and_nonces() {
    let k = auth::derive_key(b"cluster-token");
    let other = auth::derive_key(b"other-token");
    let (nr, ns) = ([1u8; 32], [2u8; 32]);
    let p = auth::sender_proof(&k, &nr, &ns);
    assert!(auth::verify(p, &auth::sender_proof(&k, &nr, &ns)));
    assert!(!auth::verify(p, &auth::sender_proof(&other, &nr, &ns)));
    assert!(!auth::verify(p, &auth::receiver_proof(&k, &nr, &ns)));
    assert!(!auth::verify(p, &auth::sender_proof(&k, &[3; 32], &ns)));
    assert!(!auth::verify(p, &p[..31]));
}

#[test]
fn switchover_and_config_refuse_bad_fields() {
    let dec = |cmd: Command, p: &[u8]| {
        Message::decode(
            &FrameHeader {
                cmd,
                flags: 0,
                length: p.len() as u64,
            },
            p,
        )
    };
    // More disks than allowed, an empty URI, a URI running past the payload.
    assert_eq!(
        dec(Command::Switchover, &(MAX_DISKS as u32 + 1).to_le_bytes()),
        Err(ProtocolError::TooManyDisks(MAX_DISKS + 1))
    );
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(dec(Command::Switchover, &p), Err(ProtocolError::BadUri));
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&10u32.to_le_bytes());
    p.extend_from_slice(b"short");
    assert_eq!(
        dec(Command::Switchover, &p),
        Err(ProtocolError::BadLength(Command::Switchover))
    );
    // A URI without its lease length.
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&5u32.to_le_bytes());
    p.extend_from_slice(b"nbd:/");
    assert_eq!(
        dec(Command::Switchover, &p),
        Err(ProtocolError::BadLength(Command::Switchover))
    );
    // An unknown switchover mode in Config.
    let mut b = Message::Config {
        chunk_size: 2 << 20,
        streams: 1,
        switchover: SwitchoverMode::Coordinated,
        switchover_timeout_s: 30,
        spec: spec(),
    }
    .encode(Compression::None);
    b[HEADER_LEN + 10] = 7;
    assert_eq!(
        dec(Command::Config, &b[HEADER_LEN..]),
        Err(ProtocolError::BadMode(7))
    );
}

#[test]
fn sparse_refuses_unaligned_pages_bad_indices_and_too_many_words() {
    let frame = |pages: Vec<SparsePage>| {
        let b = Message::Sparse { pages }.encode(Compression::None);
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&b[..HEADER_LEN]);
        let h = FrameHeader::parse(&hdr).expect("header");
        Message::decode(&h, &b[HEADER_LEN..])
    };
    let page = |gpa, words| SparsePage { gpa, words };
    assert!(frame(vec![page(0x10, vec![(0, 1)])]).is_err());
    assert!(frame(vec![page(0, vec![(512, 1)])]).is_err());
    assert!(frame(vec![page(0, vec![(5, 1), (5, 2)])]).is_err());
    assert!(frame(vec![page(0, vec![(6, 1), (5, 2)])]).is_err());
    // Not canonical: the target hashes the encodings as they come.
    assert!(frame(vec![page(0, vec![(5, 0)])]).is_err());
    let many: Vec<(u16, u64)> = (0..=MAX_SPARSE_WORDS as u16).map(|i| (i, 1)).collect();
    assert!(frame(vec![page(0, many)]).is_err());
    // The encoder never produces what the decoder refuses.
    let mut dense = vec![0u8; PAGE_SIZE as usize];
    for i in 0..=MAX_SPARSE_WORDS {
        dense[i * 8] = 1;
    }
    assert_eq!(SparsePage::encode(0, &dense), None);
    dense[MAX_SPARSE_WORDS * 8] = 0;
    let sp = SparsePage::encode(0x5000, &dense).expect("sparse enough");
    assert_eq!(sp.words.len(), MAX_SPARSE_WORDS);
    assert_eq!(
        frame(vec![sp.clone()]),
        Ok(Message::Sparse { pages: vec![sp] })
    );
}

/// A page with words at both ends and an all-zero page.
fn two_sparse_pages() -> Vec<SparsePage> {
    vec![
        SparsePage {
            gpa: 0x1000,
            words: vec![(0, 7), (511, 9)],
        },
        SparsePage {
            gpa: 0x3000,
            words: vec![],
        },
    ]
}

#[test]
fn sparse_frame_builder_writes_what_encode_writes() {
    let pages = two_sparse_pages();
    let mut f = SparseFrame::default();
    assert_eq!(
        f.finish(),
        &Message::Sparse { pages: vec![] }.encode(Compression::None)[..]
    );
    for _ in 0..2 {
        f.clear();
        for p in &pages {
            f.push(p.gpa, &p.words);
        }
        assert_eq!(f.pages(), 2);
        assert_eq!(
            f.finish(),
            &Message::Sparse {
                pages: pages.clone()
            }
            .encode(Compression::None)[..]
        );
    }
}

#[test]
fn parse_sparse_visits_what_decode_returns_and_refuses_the_same() {
    let raw = |pages: Vec<SparsePage>| {
        let b = Message::Sparse { pages }.encode(Compression::None);
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&b[..HEADER_LEN]);
        (
            FrameHeader::parse(&hdr).expect("header"),
            b[HEADER_LEN..].to_vec(),
        )
    };
    let pages = two_sparse_pages();
    let (h, p) = raw(pages.clone());
    let mut seen = Vec::new();
    parse_sparse(&h, &p, |gpa, words| {
        seen.push(SparsePage {
            gpa,
            words: words.to_vec(),
        })
    })
    .expect("valid");
    assert_eq!(seen, pages);
    // A bad page late in the frame: nothing is visited at all.
    let mut bad = pages.clone();
    bad.push(SparsePage {
        gpa: 0x4000,
        words: vec![(3, 1), (2, 1)],
    });
    let (h, p) = raw(bad);
    let mut visited = 0;
    assert!(parse_sparse(&h, &p, |_, _| visited += 1).is_err());
    assert_eq!(visited, 0);
    assert!(Message::decode(&h, &p).is_err());
}

proptest! {
    #[test]
    fn sparse_pages_expand_to_the_page_they_encode(words in proptest::collection::btree_map(0usize..512, any::<u64>(), 0..40),
                                                    page_no in 0u64..1 << 20) {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for (i, v) in &words {
            page[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let nonzero = words.values().filter(|v| **v != 0).count();
        match SparsePage::encode(page_no * PAGE_SIZE, &page) {
            None => prop_assert!(nonzero > MAX_SPARSE_WORDS),
            Some(sp) => {
                prop_assert_eq!(sp.words.len(), nonzero);
                let mut out = vec![0xffu8; PAGE_SIZE as usize];
                sp.expand_into(&mut out);
                prop_assert_eq!(&out, &page);
                let m = Message::Sparse { pages: vec![sp] };
                prop_assert_eq!(roundtrip(&m, Compression::None), m);
            }
        }
    }

    #[test]
    fn switchover_round_trips(disks in proptest::collection::vec((".{1,40}", proptest::option::of(".{1,40}")), 0..8)) {
        let disks = disks
            .into_iter()
            .map(|(nbd, lease)| DiskSpec { nbd, lease: lease.map(|l| Secret::new(l).expect("non-empty")) })
            .collect();
        let m = Message::Switchover { disks };
        prop_assert_eq!(roundtrip(&m, Compression::None), m);
    }

    /// Random headers built field by field (a random 16-byte array almost never
    /// has a known command and zero reserved bytes, so it never reached the
    /// decoder): every header the parser accepts is decoded, and a well-formed one
    /// must be accepted.
    #[test]
    fn decoding_arbitrary_headers_and_payloads_never_panics(
        cmd in 0u16..=16, flags in prop_oneof![4 => 0u16..3, 1 => any::<u16>()],
        reserved in prop_oneof![9 => Just(0u32), 1 => any::<u32>()],
        payload in proptest::collection::vec(any::<u8>(), 0..512),
        declared in prop_oneof![9 => Just(None), 1 => any::<u64>().prop_map(Some)]) {
        let length = declared.unwrap_or(payload.len() as u64);
        let mut hdr = [0u8; HEADER_LEN];
        hdr[0..2].copy_from_slice(&cmd.to_le_bytes());
        hdr[2..4].copy_from_slice(&flags.to_le_bytes());
        hdr[4..8].copy_from_slice(&reserved.to_le_bytes());
        hdr[8..16].copy_from_slice(&length.to_le_bytes());
        let c = Command::from_u16(cmd);
        let well_formed = c != Command::Invalid
            && reserved == 0
            && length <= c.max_payload()
            && (flags == 0 || (c == Command::Memory && flags < 3));
        match FrameHeader::parse(&hdr) {
            Ok(h) => {
                prop_assert!(well_formed, "accepted a malformed header {:?}", h);
                let n = (h.length as usize).min(payload.len());
                let _ = Message::decode(&h, &payload[..n]);
                if h.cmd == Command::Memory {
                    let mut d = Vec::new();
                    let _ = parse_memory(&h, &payload[..n], &mut d);
                }
                if h.cmd == Command::Sparse {
                    let _ = parse_sparse(&h, &payload[..n], |_, _| {});
                }
            }
            Err(_) => prop_assert!(!well_formed, "refused a well-formed header"),
        }
    }

    #[test]
    fn arbitrary_payload_under_any_command_never_panics(cmd in 1u16..=14, flags in 0u16..3,
                                                       payload in proptest::collection::vec(any::<u8>(), 0..256)) {
        let h = FrameHeader { cmd: Command::from_u16(cmd), flags, length: payload.len() as u64 };
        let _ = Message::decode(&h, &payload);
    }

    #[test]
    fn memory_round_trips(pages in proptest::collection::btree_set(0u64..4096, 1..20),
                          fill in any::<u8>(), c in 0u16..3) {
        let ranges: Vec<MemRange> = pages.iter().map(|p| MemRange { gpa: p * PAGE_SIZE, len: PAGE_SIZE }).collect();
        let data = vec![fill; ranges.len() * PAGE_SIZE as usize];
        let m = Message::Memory { ranges, data };
        let c = Compression::from_flag(c).expect("valid flag");
        prop_assert_eq!(roundtrip(&m, c), m);
    }

    #[test]
    fn text_messages_round_trip(s in ".{0,200}", code in 1u16..9) {
        let m = Message::Error { code: ErrorCode::from_u16(code), message: s.clone() };
        prop_assert_eq!(roundtrip(&m, Compression::None), m);
        let m = Message::Abandon { reason: s };
        prop_assert_eq!(roundtrip(&m, Compression::None), m);
    }
}
