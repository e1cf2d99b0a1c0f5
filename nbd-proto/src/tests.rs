use super::*;
use proptest::prelude::*;

#[test]
fn greeting_has_spec_bytes() {
    let mut out = Vec::new();
    Greeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    }
    .encode(&mut out);
    assert_eq!(&out[..8], b"NBDMAGIC");
    assert_eq!(&out[8..16], b"IHAVEOPT");
    assert_eq!(&out[16..], &[0, 3]);
    assert_eq!(Greeting::decode(&out), Ok(Greeting { flags: 3 }));
}

#[test]
fn compact_request_layout() {
    let req = Request {
        flags: CMD_FLAG_FUA,
        command: CMD_WRITE,
        cookie: 7,
        offset: 4096,
        length: 512,
    };
    let mut out = Vec::new();
    req.encode(false, &mut out);
    assert_eq!(out.len(), COMPACT_REQUEST_LEN);
    assert_eq!(&out[..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(&out[24..], &512u32.to_be_bytes());
    assert_eq!(Request::decode(&out, false), Ok(req));
    // Compact magic is a violation once extended headers are negotiated.
    assert!(matches!(
        Request::decode(&out, true),
        Err(CodecError::BadMagic(_))
    ));
    let mut ext = Vec::new();
    req.encode(true, &mut ext);
    assert_eq!(ext.len(), EXTENDED_REQUEST_LEN);
    assert_eq!(Request::decode(&ext, true), Ok(req));
    assert!(matches!(
        Request::decode(&ext[..28], false),
        Err(CodecError::BadMagic(_))
    ));
}

#[test]
fn extended_write_length_is_64_bit() {
    let req = Request {
        flags: 0,
        command: CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 1 << 33,
    };
    let mut out = Vec::new();
    req.encode(true, &mut out);
    let back = Request::decode(&out, true).unwrap();
    assert_eq!(back.length, 1 << 33);
    assert_eq!(back.payload_len(true), 1 << 33);
    let read = Request {
        command: CMD_READ,
        ..req
    };
    assert_eq!(read.payload_len(true), 0);
}

#[test]
fn go_option_layout() {
    let opt = ClientOption::Go(InfoRequest {
        name: "disk".into(),
        requests: vec![INFO_BLOCK_SIZE],
    });
    let mut out = Vec::new();
    opt.encode(&mut out);
    let h = OptionHeader::decode(&out[..16]).unwrap();
    assert_eq!(
        h,
        OptionHeader {
            option: OPT_GO,
            length: 4 + 4 + 2 + 2
        }
    );
    assert_eq!(ClientOption::decode(h.option, &out[16..]), Ok(opt));
}

#[test]
fn info_count_mismatch_is_rejected() {
    // name "a", claims 2 info requests but carries one.
    let data = [0, 0, 0, 1, b'a', 0, 2, 0, 3];
    assert!(ClientOption::decode(OPT_GO, &data).is_err());
    // name length beyond the data.
    let data = [0xff, 0xff, 0xff, 0xff, b'a'];
    assert!(ClientOption::decode(OPT_INFO, &data).is_err());
}

#[test]
fn meta_context_count_is_bounded_by_payload() {
    // export "", 2^32-1 queries, no bytes: must fail without allocating.
    let data = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
    assert_eq!(
        ClientOption::decode(OPT_SET_META_CONTEXT, &data),
        Err(CodecError::Malformed("meta context query count"))
    );
}

#[test]
fn no_data_options_reject_data() {
    assert!(ClientOption::decode(OPT_STRUCTURED_REPLY, &[1]).is_err());
    assert_eq!(ClientOption::decode(OPT_LIST, &[]), Ok(ClientOption::List));
}

#[test]
fn nul_in_name_is_rejected() {
    assert_eq!(
        ClientOption::decode(OPT_EXPORT_NAME, b"a\0b"),
        Err(CodecError::BadString)
    );
}

#[test]
fn export_name_reply() {
    let mut out = Vec::new();
    encode_export_name_reply(1 << 30, 3, false, &mut out);
    assert_eq!(out.len(), EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZEROES);
    assert_eq!(decode_export_name_reply(&out[..10]), Ok((1 << 30, 3)));
    out.clear();
    encode_export_name_reply(5, 1, true, &mut out);
    assert_eq!(out.len(), EXPORT_NAME_REPLY_LEN);
}

#[test]
fn structured_chunk_layout() {
    let mut out = Vec::new();
    let p = ChunkPayload::OffsetHole {
        offset: 8,
        length: 4096,
    };
    encode_chunk(false, REPLY_FLAG_DONE, 9, 0, &p, &mut out);
    assert_eq!(out.len(), STRUCTURED_REPLY_LEN + 12);
    let h = ReplyHeader::decode(&out[..20]).unwrap();
    assert_eq!(
        h,
        ReplyHeader::Chunk {
            extended: false,
            flags: 1,
            chunk_type: 2,
            cookie: 9,
            offset: 0,
            length: 12
        }
    );
    assert_eq!(ChunkPayload::decode(2, &out[20..], 12), Ok(p));
}

#[test]
fn block_status_ext_requires_exact_count() {
    let p = ChunkPayload::BlockStatus {
        context_id: 1,
        wide: true,
        extents: vec![Extent {
            length: 1 << 40,
            flags: 3,
        }],
    };
    let mut out = Vec::new();
    p.encode(&mut out);
    assert_eq!(out.len() as u64, p.wire_len());
    assert_eq!(ChunkPayload::decode(6, &out, p.wire_len()), Ok(p));
    // Count says 2, one extent present.
    out[7] = 2;
    assert!(ChunkPayload::decode(6, &out, 24).is_err());
}

fn arb_string() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:;=/._-]{0,40}"
}

fn arb_option() -> impl Strategy<Value = ClientOption> {
    prop_oneof![
        arb_string().prop_map(ClientOption::ExportName),
        Just(ClientOption::Abort),
        Just(ClientOption::List),
        Just(ClientOption::StartTls),
        Just(ClientOption::StructuredReply),
        Just(ClientOption::ExtendedHeaders),
        (arb_string(), proptest::collection::vec(any::<u16>(), 0..5))
            .prop_map(|(name, requests)| ClientOption::Info(InfoRequest { name, requests })),
        (arb_string(), proptest::collection::vec(any::<u16>(), 0..5))
            .prop_map(|(name, requests)| ClientOption::Go(InfoRequest { name, requests })),
        (arb_string(), proptest::collection::vec(arb_string(), 0..4)).prop_map(
            |(export, queries)| ClientOption::ListMetaContext(MetaContextRequest {
                export,
                queries
            })
        ),
        (arb_string(), proptest::collection::vec(arb_string(), 0..4)).prop_map(
            |(export, queries)| ClientOption::SetMetaContext(MetaContextRequest {
                export,
                queries
            })
        ),
        (12u32.., proptest::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(option, data)| ClientOption::Unknown { option, data }),
    ]
}

fn arb_info() -> impl Strategy<Value = InfoItem> {
    prop_oneof![
        (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| InfoItem::Export { size, flags }),
        arb_string().prop_map(InfoItem::Name),
        arb_string().prop_map(InfoItem::Description),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, preferred, max)| {
            InfoItem::BlockSize {
                min,
                preferred,
                max,
            }
        }),
        (4u16.., proptest::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(kind, data)| InfoItem::Unknown { kind, data }),
    ]
}

fn arb_option_reply() -> impl Strategy<Value = OptionReply> {
    prop_oneof![
        Just(OptionReply::Ack),
        (arb_string(), arb_string())
            .prop_map(|(name, description)| OptionReply::Server { name, description }),
        arb_info().prop_map(OptionReply::Info),
        (any::<u32>(), arb_string()).prop_map(|(id, name)| OptionReply::MetaContext { id, name }),
        ((1u32..64), arb_string()).prop_map(|(c, message)| OptionReply::Error {
            code: REP_FLAG_ERROR | c,
            message
        }),
        (5u32..1000, proptest::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(reply_type, data)| OptionReply::Unknown { reply_type, data }),
    ]
}

fn arb_extents(wide: bool) -> impl Strategy<Value = Vec<Extent>> {
    let max = if wide { u64::MAX } else { u32::MAX as u64 };
    proptest::collection::vec(
        (1..=max, any::<u32>()).prop_map(|(length, flags)| Extent { length, flags }),
        1..8,
    )
}

fn arb_chunk() -> impl Strategy<Value = ChunkPayload> {
    prop_oneof![
        Just(ChunkPayload::None),
        (any::<u64>(), 1u64..1 << 30)
            .prop_map(|(offset, data_len)| ChunkPayload::OffsetData { offset, data_len }),
        (any::<u64>(), 1u32..)
            .prop_map(|(offset, length)| ChunkPayload::OffsetHole { offset, length }),
        (any::<u32>(), arb_extents(false)).prop_map(|(context_id, extents)| {
            ChunkPayload::BlockStatus {
                context_id,
                wide: false,
                extents,
            }
        }),
        (any::<u32>(), arb_extents(true)).prop_map(|(context_id, extents)| {
            ChunkPayload::BlockStatus {
                context_id,
                wide: true,
                extents,
            }
        }),
        (any::<u32>(), arb_string())
            .prop_map(|(error, message)| ChunkPayload::Error { error, message }),
        (any::<u32>(), arb_string(), any::<u64>()).prop_map(|(error, message, offset)| {
            ChunkPayload::ErrorOffset {
                error,
                message,
                offset,
            }
        }),
        (100u16..1000, proptest::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(chunk_type, data)| ChunkPayload::Unknown { chunk_type, data }),
    ]
}

proptest! {
    #[test]
    fn option_round_trip(opt in arb_option()) {
        let mut out = Vec::new();
        opt.encode(&mut out);
        let h = OptionHeader::decode(&out[..OPTION_HEADER_LEN]).unwrap();
        prop_assert_eq!(h.length as usize, out.len() - OPTION_HEADER_LEN);
        prop_assert_eq!(ClientOption::decode(h.option, &out[OPTION_HEADER_LEN..]).unwrap(), opt);
    }

    #[test]
    fn option_reply_round_trip(rep in arb_option_reply(), option in any::<u32>()) {
        let mut out = Vec::new();
        rep.encode(option, &mut out);
        let h = OptionReplyHeader::decode(&out[..OPTION_REPLY_HEADER_LEN]).unwrap();
        prop_assert_eq!(h.option, option);
        prop_assert_eq!(h.length as usize, out.len() - OPTION_REPLY_HEADER_LEN);
        prop_assert_eq!(OptionReply::decode(h.reply_type, &out[OPTION_REPLY_HEADER_LEN..]).unwrap(), rep);
    }

    #[test]
    fn request_round_trip(flags in any::<u16>(), command in any::<u16>(), cookie in any::<u64>(),
                          offset in any::<u64>(), len32 in any::<u32>(), len64 in any::<u64>()) {
        let compact = Request { flags, command, cookie, offset, length: len32 as u64 };
        let mut out = Vec::new();
        compact.encode(false, &mut out);
        prop_assert_eq!(Request::decode(&out, false).unwrap(), compact);
        let ext = Request { length: len64, ..compact };
        out.clear();
        ext.encode(true, &mut out);
        prop_assert_eq!(Request::decode(&out, true).unwrap(), ext);
    }

    #[test]
    fn reply_round_trip(chunk in arb_chunk(), extended in any::<bool>(), flags in any::<u16>(),
                        cookie in any::<u64>(), offset in any::<u64>()) {
        let mut out = Vec::new();
        let req_offset = if extended { offset } else { 0 };
        encode_chunk(extended, flags, cookie, req_offset, &chunk, &mut out);
        let magic = u32::from_be_bytes([out[0], out[1], out[2], out[3]]);
        let hl = ReplyHeader::len_for_magic(magic).unwrap();
        let h = ReplyHeader::decode(&out[..hl]).unwrap();
        let ReplyHeader::Chunk { chunk_type, length, offset: o, flags: f, cookie: c, .. } = h else {
            panic!("not a chunk");
        };
        prop_assert_eq!((o, f, c), (req_offset, flags, cookie));
        prop_assert_eq!(length, chunk.wire_len());
        prop_assert_eq!(ChunkPayload::decode(chunk_type, &out[hl..], length).unwrap(), chunk);
    }

    #[test]
    fn simple_reply_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
        let mut out = Vec::new();
        ReplyHeader::Simple { error, cookie }.encode(&mut out);
        prop_assert_eq!(out.len(), SIMPLE_REPLY_LEN);
        prop_assert_eq!(ReplyHeader::decode(&out).unwrap(), ReplyHeader::Simple { error, cookie });
    }

    #[test]
    fn decoders_never_panic(option in any::<u32>(), t in any::<u16>(), rt in any::<u32>(),
                            data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = ClientOption::decode(option % 16, &data);
        let _ = ClientOption::decode(option, &data);
        let _ = OptionReply::decode(rt, &data);
        let _ = OptionReply::decode(rt % 5, &data);
        let _ = ChunkPayload::decode(t, &data, data.len() as u64);
        let _ = ChunkPayload::decode(t % 7, &data, data.len() as u64);
        let _ = ReplyHeader::decode(&data);
        let _ = Request::decode(&data, false);
        let _ = Request::decode(&data, true);
        let _ = OptionHeader::decode(&data);
        let _ = Greeting::decode(&data);
    }
}
