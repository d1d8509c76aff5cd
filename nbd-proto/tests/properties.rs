//! Property tests for the NBD codec.
//!
//! Two families:
//! - every decoder, fed arbitrary bytes, returns instead of panicking; when it accepts the
//!   input, encoding the decoded value gives back exactly the bytes it consumed (the wire
//!   forms are canonical, so decode is a left inverse of encode);
//! - every encoder, given a valid value, produces bytes that decode to that value.
//!
//! Inputs mix uniformly random bytes with "field-shaped" bytes (the right magic up front,
//! small length and count fields) so that the checks behind the magic and length tests are
//! reached often, not once in 2^32 cases.

use nbd_proto::consts::*;
use nbd_proto::handshake::*;
use nbd_proto::transmission::*;
use proptest::prelude::*;

// ---------------------------------------------------------------- strategies

/// Uniformly random bytes.
fn raw(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// Bytes built from protocol-shaped pieces: small big-endian lengths and counts, short
/// strings (sometimes with NUL or invalid UTF-8), and random runs.
fn fields() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        (0u32..24).prop_map(|v| v.to_be_bytes().to_vec()),
        (0u16..6).prop_map(|v| v.to_be_bytes().to_vec()),
        "[a-z:]{0,8}".prop_map(String::into_bytes),
        Just(vec![0u8]),
        Just(vec![0xff]),
        raw(8),
    ];
    prop::collection::vec(piece, 0..10).prop_map(|v| v.concat())
}

/// Arbitrary bytes, field-shaped bytes, or field-shaped bytes after one of `prefixes`.
fn input(prefixes: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let prefixed =
        (prop::sample::select(prefixes), fields()).prop_map(|(p, rest)| [p, rest].concat());
    prop_oneof![raw(96), fields(), prefixed]
}

/// Valid protocol strings: no NUL, well under the 4096-byte limit.
fn string() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,24}"
}

/// Valid encodings as they are, or with one byte overwritten, cut short, or extended, so
/// that both the accepting paths and every error check right next to them are reached.
fn mutated(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        valid,
        0u8..4,
        any::<prop::sample::Index>(),
        any::<u8>(),
        raw(5),
    )
        .prop_map(|(mut v, how, at, byte, tail)| {
            match how {
                0 => {}
                1 => {
                    if !v.is_empty() {
                        let i = at.index(v.len());
                        v[i] = byte;
                    }
                }
                2 => v.truncate(at.index(v.len() + 1)),
                _ => v.extend_from_slice(&tail),
            }
            v
        })
}

fn go_data() -> impl Strategy<Value = Vec<u8>> {
    (string(), prop::collection::vec(any::<u16>(), 0..6)).prop_map(|(name, info_requests)| {
        GoRequest {
            name,
            info_requests,
        }
        .encode()
    })
}

fn meta_data() -> impl Strategy<Value = Vec<u8>> {
    (string(), prop::collection::vec(string(), 0..4))
        .prop_map(|(export, queries)| MetaContextRequest { export, queries }.encode())
}

/// An option code with data: arbitrary pairs, and mutated valid data for each known option.
fn option_with_data() -> impl Strategy<Value = (u32, Vec<u8>)> {
    let no_data_opts = vec![
        OPT_EXPORT_NAME,
        OPT_ABORT,
        OPT_LIST,
        OPT_STARTTLS,
        OPT_STRUCTURED_REPLY,
    ];
    prop_oneof![
        (option_code(), prop_oneof![raw(96), fields()]),
        (
            prop::sample::select(vec![OPT_INFO, OPT_GO]),
            mutated(go_data())
        ),
        (
            prop::sample::select(vec![OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT]),
            mutated(meta_data())
        ),
        (
            prop::sample::select(no_data_opts),
            mutated(prop_oneof![
                Just(Vec::new()),
                string().prop_map(String::into_bytes)
            ])
        ),
    ]
}

/// Payloads after the 20-byte header of an option reply or chunk, from one encoder call.
fn payload_of(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut wire = enc(f);
    wire.drain(..20);
    wire
}

fn info_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<u64>(), any::<u16>())
            .prop_map(|(size, flags)| payload_of(|o| encode_rep_info_export(o, 0, size, flags))),
        string().prop_map(|n| payload_of(|o| encode_rep_info_name(o, 0, &n))),
        string().prop_map(|d| payload_of(|o| encode_rep_info_description(o, 0, &d))),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(minimum, preferred, maximum)| {
            let bs = BlockSize {
                minimum,
                preferred,
                maximum,
            };
            payload_of(|o| encode_rep_info_block_size(o, 0, bs))
        }),
    ]
}

fn block_status_payload() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u32>(),
        prop::collection::vec((0u32..3, any::<u32>()), 1..6),
    )
        .prop_map(|(id, extents)| {
            let extents: Vec<_> = extents
                .into_iter()
                .map(|(len, flags)| BlockStatusExtent {
                    len: len.max(1),
                    flags,
                })
                .collect();
            payload_of(|o| encode_block_status(o, 0, id, &extents, false))
        })
}

/// (chunk type, error payload) with a matching or an unknown error type.
fn error_chunk() -> impl Strategy<Value = (u16, Vec<u8>)> {
    let ty = prop_oneof![
        Just(REPLY_TYPE_ERROR),
        Just(REPLY_TYPE_ERROR_OFFSET),
        any::<u16>(),
    ];
    let valid = (0u32..3, string(), any::<u64>(), any::<bool>()).prop_map(
        |(error, message, offset, with_offset)| {
            // The encoders require a non-zero error; a zero is written in by hand.
            let wire = if with_offset {
                payload_of(|o| encode_error_offset_chunk(o, 0, 1, &message, offset, false))
            } else {
                payload_of(|o| encode_error_chunk(o, 0, 1, &message, false))
            };
            [error.to_be_bytes().to_vec(), wire[4..].to_vec()].concat()
        },
    );
    prop_oneof![
        (ty.clone(), prop_oneof![raw(64), fields()]),
        (ty, mutated(valid)),
    ]
}

/// Option codes: mostly the known ones, sometimes anything.
fn option_code() -> impl Strategy<Value = u32> {
    prop_oneof![3 => 0u32..=12, 1 => any::<u32>()]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![3 => 0u16..=8, 1 => any::<u16>()].prop_map(Command::from_wire)
}

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn enc(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    f(&mut out);
    out
}

/// The payload after a 20-byte option reply header or chunk header.
fn payload(wire: &[u8]) -> &[u8] {
    &wire[20..]
}

// ================================================================ decoders on arbitrary bytes

proptest! {
    #[test]
    fn greeting_decoder_total(buf in input(vec![[be64(INIT_PASSWD), be64(IHAVEOPT)].concat()])) {
        if let Ok(flags) = decode_greeting(&buf) {
            prop_assert_eq!(enc(|o| encode_greeting(o, flags)), &buf[..GREETING_BYTES]);
        }
    }

    #[test]
    fn client_flags_decoder_total(buf in raw(8), offered in any::<u16>()) {
        if let Ok(flags) = decode_client_flags(&buf, offered) {
            prop_assert_eq!(enc(|o| encode_client_flags(o, flags)), &buf[..4]);
            prop_assert!(!flags.fixed_newstyle || offered & FLAG_FIXED_NEWSTYLE != 0);
            prop_assert!(!flags.no_zeroes || offered & FLAG_NO_ZEROES != 0);
        }
    }

    #[test]
    fn option_header_decoder_total(buf in input(vec![be64(IHAVEOPT)])) {
        if let Ok(h) = decode_option_header(&buf) {
            let mut expected = enc(|o| encode_option(o, h.option, &[]));
            expected.truncate(12);
            prop_assert_eq!(&expected[..], &buf[..12]);
            prop_assert_eq!(be32(h.len), &buf[12..16]);
        }
    }

    #[test]
    fn option_decoder_total((option, data) in option_with_data()) {
        match decode_option(option, &data) {
            Ok(ClientOption::ExportName(name)) => {
                prop_assert_eq!(option, OPT_EXPORT_NAME);
                prop_assert_eq!(name.as_bytes(), &data[..]);
            }
            Ok(ClientOption::Abort) => prop_assert_eq!(option, OPT_ABORT),
            Ok(ClientOption::List) => {
                prop_assert_eq!(option, OPT_LIST);
                prop_assert!(data.is_empty());
            }
            Ok(ClientOption::StartTls) => {
                prop_assert_eq!(option, OPT_STARTTLS);
                prop_assert!(data.is_empty());
            }
            Ok(ClientOption::StructuredReply) => {
                prop_assert_eq!(option, OPT_STRUCTURED_REPLY);
                prop_assert!(data.is_empty());
            }
            Ok(ClientOption::Info(req)) => {
                prop_assert_eq!(option, OPT_INFO);
                prop_assert_eq!(req.encode(), data);
            }
            Ok(ClientOption::Go(req)) => {
                prop_assert_eq!(option, OPT_GO);
                prop_assert_eq!(req.encode(), data);
            }
            Ok(ClientOption::ListMetaContext(req)) => {
                prop_assert_eq!(option, OPT_LIST_META_CONTEXT);
                prop_assert_eq!(req.encode(), data);
            }
            Ok(ClientOption::SetMetaContext(req)) => {
                prop_assert_eq!(option, OPT_SET_META_CONTEXT);
                prop_assert_eq!(req.encode(), data);
            }
            Ok(ClientOption::Unsupported(code)) => {
                prop_assert_eq!(code, option);
                prop_assert!(
                    option == OPT_PEEK_EXPORT || option == OPT_EXTENDED_HEADERS || option == 0
                        || option > OPT_EXTENDED_HEADERS
                );
            }
            Err(e) => {
                prop_assert_eq!(e.option, option);
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn option_reply_header_decoder_total(buf in input(vec![be64(OPTION_REPLY_MAGIC)])) {
        if let Ok(h) = decode_option_reply_header(&buf) {
            let mut expected = enc(|o| encode_option_reply(o, h.option, h.reply_type, &[]));
            expected.truncate(16);
            prop_assert_eq!(&expected[..], &buf[..16]);
            prop_assert_eq!(be32(h.len), &buf[16..20]);
            prop_assert_eq!(h.is_error(), h.reply_type >= 1 << 31);
        }
    }

    #[test]
    fn info_decoder_total(buf in prop_oneof![raw(32), mutated(info_payload())]) {
        let reencoded = match decode_info(&buf) {
            Ok(Info::Export { size, flags }) => enc(|o| encode_rep_info_export(o, 0, size, flags)),
            Ok(Info::Name(name)) => enc(|o| encode_rep_info_name(o, 0, &name)),
            Ok(Info::Description(d)) => enc(|o| encode_rep_info_description(o, 0, &d)),
            Ok(Info::BlockSize(bs)) => enc(|o| encode_rep_info_block_size(o, 0, bs)),
            Ok(Info::Unknown(ty)) => {
                prop_assert!(ty > INFO_BLOCK_SIZE);
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        prop_assert_eq!(payload(&reencoded), &buf[..]);
    }

    #[test]
    fn rep_server_decoder_total(
        buf in prop_oneof![
            raw(64),
            fields(),
            mutated((string(), string()).prop_map(|(n, d)| {
                payload_of(|o| encode_rep_server(o, OPT_LIST, &n, &d))
            })),
        ],
    ) {
        if let Ok((name, description)) = decode_rep_server(&buf) {
            let wire = enc(|o| encode_rep_server(o, OPT_LIST, &name, &description));
            prop_assert_eq!(payload(&wire), &buf[..]);
        }
    }

    #[test]
    fn rep_meta_context_decoder_total(
        buf in prop_oneof![
            raw(64),
            mutated((any::<u32>(), string()).prop_map(|(id, n)| {
                payload_of(|o| encode_rep_meta_context(o, OPT_SET_META_CONTEXT, id, &n))
            })),
        ],
    ) {
        if let Ok((id, name)) = decode_rep_meta_context(&buf) {
            let wire = enc(|o| encode_rep_meta_context(o, OPT_LIST_META_CONTEXT, id, &name));
            prop_assert_eq!(payload(&wire), &buf[..]);
        }
    }

    #[test]
    fn export_name_reply_decoder_total(buf in raw(16)) {
        if let Ok((size, flags)) = decode_export_name_reply(&buf) {
            let wire = enc(|o| encode_export_name_reply(o, size, flags, true));
            prop_assert_eq!(&wire[..], &buf[..10]);
        }
    }

    #[test]
    fn request_decoder_total(
        buf in prop_oneof![
            input(vec![REQUEST_MAGIC.to_be_bytes().to_vec()]),
            mutated((any::<u16>(), command(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
                |(flags, command, cookie, offset, len)| {
                    enc(|o| encode_request(o, &Request { flags, command, cookie, offset, len }))
                },
            )),
        ],
    ) {
        match decode_request(&buf) {
            Ok(req) => {
                prop_assert_eq!(enc(|o| encode_request(o, &req)), &buf[..REQUEST_BYTES]);
                prop_assert_eq!(Command::from_wire(req.command.to_wire()), req.command);
            }
            Err(_) => {
                prop_assert!(buf.len() < REQUEST_BYTES || buf[..4] != REQUEST_MAGIC.to_be_bytes());
            }
        }
    }

    #[test]
    fn simple_reply_decoder_total(buf in input(vec![SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec()])) {
        if let Ok(r) = decode_simple_reply(&buf) {
            prop_assert_eq!(enc(|o| encode_simple_reply(o, r.cookie, r.error)), &buf[..16]);
            prop_assert_eq!(decode_reply_kind(&buf), Ok(ReplyKind::Simple));
        }
    }

    #[test]
    fn chunk_header_decoder_total(buf in input(vec![STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec()])) {
        if let Ok(h) = decode_chunk_header(&buf) {
            let wire = enc(|o| encode_chunk_header(o, h.flags, h.ty, h.cookie, h.len));
            prop_assert_eq!(&wire[..], &buf[..CHUNK_HEADER_BYTES]);
            prop_assert_eq!(decode_reply_kind(&buf), Ok(ReplyKind::Structured));
        }
    }

    #[test]
    fn block_status_decoder_total(buf in prop_oneof![raw(80), fields(), mutated(block_status_payload())]) {
        if let Ok((id, extents)) = decode_block_status(&buf) {
            prop_assert!(!extents.is_empty());
            prop_assert!(extents.iter().all(|e| e.len != 0));
            let wire = enc(|o| encode_block_status(o, 0, id, &extents, false));
            prop_assert_eq!(payload(&wire), &buf[..]);
        }
    }

    #[test]
    fn error_chunk_decoder_total((ty, buf) in error_chunk()) {
        if let Ok(e) = decode_error_chunk(ty, &buf) {
            prop_assert!(ty & REPLY_TYPE_FLAG_ERROR != 0);
            prop_assert!(e.error != 0);
            prop_assert_eq!(e.offset.is_some(), ty == REPLY_TYPE_ERROR_OFFSET);
            // Messages up to the encoder's clip length re-encode exactly.
            if e.message.len() <= MAX_ERROR_MESSAGE_BYTES {
                let wire = match (ty, e.offset) {
                    (REPLY_TYPE_ERROR, None) => {
                        enc(|o| encode_error_chunk(o, 0, e.error, &e.message, false))
                    }
                    (REPLY_TYPE_ERROR_OFFSET, Some(offset)) => enc(|o| {
                        encode_error_offset_chunk(o, 0, e.error, &e.message, offset, false)
                    }),
                    _ => return Ok(()), // unknown error type: only the common prefix is known
                };
                prop_assert_eq!(payload(&wire), &buf[..]);
            }
        }
    }

    #[test]
    fn offset_data_decoder_total(buf in raw(48)) {
        if let Ok((offset, data)) = decode_offset_data(&buf) {
            prop_assert!(!data.is_empty());
            let len = u32::try_from(data.len()).expect("test payload is short");
            let mut wire = enc(|o| encode_offset_data_header(o, 0, offset, len, false));
            wire.extend_from_slice(data);
            prop_assert_eq!(payload(&wire), &buf[..]);
        }
    }

    #[test]
    fn offset_hole_decoder_total(
        buf in prop_oneof![
            raw(16),
            mutated((any::<u64>(), 0u32..2).prop_map(|(offset, len)| {
                [offset.to_be_bytes().to_vec(), len.to_be_bytes().to_vec()].concat()
            })),
        ],
    ) {
        if let Ok((offset, len)) = decode_offset_hole(&buf) {
            let wire = enc(|o| encode_offset_hole(o, 0, offset, len, false));
            prop_assert_eq!(payload(&wire), &buf[..]);
        }
    }
}

// ================================================================ encode -> decode round trips

proptest! {
    #[test]
    fn request_round_trip(
        flags in any::<u16>(),
        command in command(),
        cookie in any::<u64>(),
        offset in any::<u64>(),
        len in any::<u32>(),
    ) {
        let req = Request { flags, command, cookie, offset, len };
        let wire = enc(|o| encode_request(o, &req));
        prop_assert_eq!(wire.len(), REQUEST_BYTES);
        prop_assert_eq!(decode_request(&wire), Ok(req));
        prop_assert_eq!(req.payload_len(), if command == Command::Write { len } else { 0 });
    }

    #[test]
    fn go_request_round_trip(
        name in string(),
        info_requests in prop::collection::vec(any::<u16>(), 0..=usize::from(MAX_INFO_REQUESTS)),
        info in any::<bool>(),
    ) {
        let req = GoRequest { name, info_requests };
        let data = req.encode();
        prop_assert_eq!(data.len(), 6 + req.name.len() + 2 * req.info_requests.len());
        if info {
            prop_assert_eq!(decode_option(OPT_INFO, &data), Ok(ClientOption::Info(req)));
        } else {
            prop_assert_eq!(decode_option(OPT_GO, &data), Ok(ClientOption::Go(req)));
        }
    }

    #[test]
    fn meta_context_request_round_trip(
        export in string(),
        queries in prop::collection::vec(string(), 0..16),
        list in any::<bool>(),
    ) {
        let req = MetaContextRequest { export, queries };
        let data = req.encode();
        if list {
            prop_assert_eq!(
                decode_option(OPT_LIST_META_CONTEXT, &data),
                Ok(ClientOption::ListMetaContext(req))
            );
        } else {
            prop_assert_eq!(
                decode_option(OPT_SET_META_CONTEXT, &data),
                Ok(ClientOption::SetMetaContext(req))
            );
        }
    }

    #[test]
    fn option_round_trip(option in option_code(), data in raw(64)) {
        let wire = enc(|o| encode_option(o, option, &data));
        let header = decode_option_header(&wire).expect("encoded header decodes");
        prop_assert_eq!(header, OptionHeader { option, len: u32::try_from(data.len()).expect("short") });
        prop_assert_eq!(&wire[OPTION_HEADER_BYTES..], &data[..]);
    }

    #[test]
    fn export_name_option_round_trip(name in string()) {
        prop_assert_eq!(
            decode_option(OPT_EXPORT_NAME, name.as_bytes()),
            Ok(ClientOption::ExportName(name))
        );
    }

    #[test]
    fn greeting_and_client_flags_round_trip(
        handshake_flags in any::<u16>(),
        fixed_newstyle in any::<bool>(),
        no_zeroes in any::<bool>(),
    ) {
        let wire = enc(|o| encode_greeting(o, handshake_flags));
        prop_assert_eq!(wire.len(), GREETING_BYTES);
        prop_assert_eq!(decode_greeting(&wire), Ok(handshake_flags));
        let flags = ClientFlags { fixed_newstyle, no_zeroes };
        let wire = enc(|o| encode_client_flags(o, flags));
        prop_assert_eq!(decode_client_flags(&wire, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES), Ok(flags));
    }

    #[test]
    fn rep_ack_round_trip(option in any::<u32>()) {
        let wire = enc(|o| encode_rep_ack(o, option));
        prop_assert_eq!(
            decode_option_reply_header(&wire),
            Ok(OptionReplyHeader { option, reply_type: REP_ACK, len: 0 })
        );
        prop_assert_eq!(wire.len(), OPTION_REPLY_HEADER_BYTES);
    }

    #[test]
    fn rep_server_round_trip(option in any::<u32>(), name in string(), description in string()) {
        let wire = enc(|o| encode_rep_server(o, option, &name, &description));
        let h = decode_option_reply_header(&wire).expect("encoded header decodes");
        prop_assert_eq!((h.option, h.reply_type), (option, REP_SERVER));
        prop_assert_eq!(h.len as usize, wire.len() - OPTION_REPLY_HEADER_BYTES);
        prop_assert_eq!(decode_rep_server(payload(&wire)), Ok((name, description)));
    }

    #[test]
    fn rep_info_round_trip(
        option in any::<u32>(),
        size in any::<u64>(),
        flags in any::<u16>(),
        name in string(),
        min_log2 in 0u32..=16,
        pref_log2 in 9u32..=16,
        max_extra in 0u32..(1 << 26),
    ) {
        let wire = enc(|o| encode_rep_info_export(o, option, size, flags));
        let h = decode_option_reply_header(&wire).expect("encoded header decodes");
        prop_assert_eq!((h.option, h.reply_type, h.len), (option, REP_INFO, 12));
        prop_assert_eq!(decode_info(payload(&wire)), Ok(Info::Export { size, flags }));

        let wire = enc(|o| encode_rep_info_name(o, option, &name));
        prop_assert_eq!(decode_info(payload(&wire)), Ok(Info::Name(name.clone())));
        let wire = enc(|o| encode_rep_info_description(o, option, &name));
        prop_assert_eq!(decode_info(payload(&wire)), Ok(Info::Description(name)));

        let minimum = 1 << min_log2;
        let preferred = (1 << pref_log2).max(minimum);
        let bs = BlockSize { minimum, preferred, maximum: preferred + max_extra };
        prop_assert_eq!(bs.validate(), Ok(()));
        let wire = enc(|o| encode_rep_info_block_size(o, option, bs));
        let h = decode_option_reply_header(&wire).expect("encoded header decodes");
        prop_assert_eq!((h.reply_type, h.len), (REP_INFO, 14));
        prop_assert_eq!(decode_info(payload(&wire)), Ok(Info::BlockSize(bs)));
    }

    #[test]
    fn rep_meta_context_round_trip(option in any::<u32>(), id in any::<u32>(), name in string()) {
        let wire = enc(|o| encode_rep_meta_context(o, option, id, &name));
        let h = decode_option_reply_header(&wire).expect("encoded header decodes");
        prop_assert_eq!((h.option, h.reply_type), (option, REP_META_CONTEXT));
        prop_assert_eq!(decode_rep_meta_context(payload(&wire)), Ok((id, name)));
    }

    #[test]
    fn rep_error_round_trip(
        option in any::<u32>(),
        code in 1u32..=10,
        message in "[^\u{0}]{0,300}",
    ) {
        let reply_type = REP_FLAG_ERROR | code;
        let wire = enc(|o| encode_rep_error(o, option, reply_type, &message));
        let h = decode_option_reply_header(&wire).expect("encoded header decodes");
        prop_assert!(h.is_error());
        prop_assert_eq!((h.option, h.reply_type), (option, reply_type));
        let sent = std::str::from_utf8(payload(&wire)).expect("clipped on a char boundary");
        prop_assert_eq!(h.len as usize, sent.len());
        prop_assert!(sent.len() <= MAX_ERROR_MESSAGE_BYTES);
        prop_assert!(message.starts_with(sent));
        // Clipping only removes what does not fit, at most one partial character.
        prop_assert!(sent.len() == message.len() || sent.len() > MAX_ERROR_MESSAGE_BYTES - 4);
    }

    #[test]
    fn export_name_reply_round_trip(size in any::<u64>(), flags in any::<u16>(), no_zeroes in any::<bool>()) {
        let wire = enc(|o| encode_export_name_reply(o, size, flags, no_zeroes));
        let expected_len = if no_zeroes { 10 } else { 134 };
        prop_assert_eq!(wire.len(), expected_len);
        prop_assert!(wire[10..].iter().all(|&b| b == 0));
        prop_assert_eq!(decode_export_name_reply(&wire), Ok((size, flags)));
    }

    #[test]
    fn simple_reply_round_trip(cookie in any::<u64>(), error in any::<u32>()) {
        let wire = enc(|o| encode_simple_reply(o, cookie, error));
        prop_assert_eq!(decode_simple_reply(&wire), Ok(SimpleReply { error, cookie }));
    }

    #[test]
    fn offset_data_round_trip(
        cookie in any::<u64>(),
        offset in any::<u64>(),
        data in prop::collection::vec(any::<u8>(), 1..256),
        done in any::<bool>(),
    ) {
        let len = u32::try_from(data.len()).expect("short");
        let mut wire = enc(|o| encode_offset_data_header(o, cookie, offset, len, done));
        prop_assert_eq!(wire.len(), OFFSET_DATA_HEADER_BYTES);
        wire.extend_from_slice(&data);
        let h = decode_chunk_header(&wire).expect("encoded header decodes");
        prop_assert_eq!(h, ChunkHeader {
            flags: if done { REPLY_FLAG_DONE } else { 0 },
            ty: REPLY_TYPE_OFFSET_DATA,
            cookie,
            len: len + 8,
        });
        prop_assert_eq!(decode_offset_data(payload(&wire)), Ok((offset, &data[..])));
    }

    #[test]
    fn offset_hole_round_trip(cookie in any::<u64>(), offset in any::<u64>(), len in 1u32.., done in any::<bool>()) {
        let wire = enc(|o| encode_offset_hole(o, cookie, offset, len, done));
        let h = decode_chunk_header(&wire).expect("encoded header decodes");
        prop_assert_eq!((h.ty, h.cookie, h.len, h.is_done()), (REPLY_TYPE_OFFSET_HOLE, cookie, 12, done));
        prop_assert_eq!(decode_offset_hole(payload(&wire)), Ok((offset, len)));
    }

    #[test]
    fn block_status_round_trip(
        cookie in any::<u64>(),
        id in any::<u32>(),
        extents in prop::collection::vec((1u32.., any::<u32>()), 1..64),
        done in any::<bool>(),
    ) {
        let extents: Vec<_> = extents
            .into_iter()
            .map(|(len, flags)| BlockStatusExtent { len, flags })
            .collect();
        let wire = enc(|o| encode_block_status(o, cookie, id, &extents, done));
        let h = decode_chunk_header(&wire).expect("encoded header decodes");
        prop_assert_eq!((h.ty, h.cookie, h.is_done()), (REPLY_TYPE_BLOCK_STATUS, cookie, done));
        prop_assert_eq!(h.len as usize, 4 + 8 * extents.len());
        prop_assert_eq!(decode_block_status(payload(&wire)), Ok((id, extents)));
    }

    #[test]
    fn error_chunks_round_trip(
        cookie in any::<u64>(),
        error in 1u32..,
        message in "[^\u{0}]{0,300}",
        offset in any::<u64>(),
        done in any::<bool>(),
    ) {
        let wire = enc(|o| encode_error_chunk(o, cookie, error, &message, done));
        let h = decode_chunk_header(&wire).expect("encoded header decodes");
        prop_assert_eq!((h.ty, h.cookie, h.is_done(), h.is_error()), (REPLY_TYPE_ERROR, cookie, done, true));
        prop_assert_eq!(h.len as usize, wire.len() - CHUNK_HEADER_BYTES);
        let e = decode_error_chunk(h.ty, payload(&wire)).expect("encoded error chunk decodes");
        prop_assert_eq!(e.error, error);
        prop_assert_eq!(e.offset, None);
        prop_assert!(e.message.len() <= MAX_ERROR_MESSAGE_BYTES);
        prop_assert!(message.starts_with(&e.message));
        prop_assert!(e.message.len() == message.len() || e.message.len() > MAX_ERROR_MESSAGE_BYTES - 4);

        let wire = enc(|o| encode_error_offset_chunk(o, cookie, error, &message, offset, done));
        let h = decode_chunk_header(&wire).expect("encoded header decodes");
        prop_assert_eq!((h.ty, h.is_error()), (REPLY_TYPE_ERROR_OFFSET, true));
        prop_assert_eq!(h.len as usize, wire.len() - CHUNK_HEADER_BYTES);
        let eo = decode_error_chunk(h.ty, payload(&wire)).expect("encoded error chunk decodes");
        prop_assert_eq!(eo.error, error);
        prop_assert_eq!(eo.message, e.message);
        prop_assert_eq!(eo.offset, Some(offset));
    }

    #[test]
    fn none_chunk_round_trip(cookie in any::<u64>()) {
        let wire = enc(|o| encode_none_chunk(o, cookie));
        prop_assert_eq!(
            decode_chunk_header(&wire),
            Ok(ChunkHeader { flags: REPLY_FLAG_DONE, ty: REPLY_TYPE_NONE, cookie, len: 0 })
        );
        prop_assert_eq!(wire.len(), CHUNK_HEADER_BYTES);
    }
}
