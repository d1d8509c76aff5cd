//! Byte-exact golden tests for every message `nbd-proto` encodes or decodes.
//!
//! Expected bytes are written out field by field from the layouts in `doc/proto.md` of
//! NetworkBlockDevice/nbd (the section is named above each group), never produced by the
//! encoder under test, so a wire change fails here even when encoder and decoder change
//! together. Each hex literal is one protocol field; whitespace inside a literal is ignored.

use nbd_proto::DecodeError;
use nbd_proto::consts::*;
use nbd_proto::handshake::*;
use nbd_proto::transmission::*;

// ---------------------------------------------------------------- helpers

/// Concatenates hex fields into bytes.
fn hex(fields: &[&str]) -> Vec<u8> {
    let digits: String = fields
        .concat()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in {digits:?}"
    );
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("test literal is valid hex"))
        .collect()
}

/// Runs an encoder into a fresh buffer.
fn enc(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    f(&mut out);
    out
}

/// The error `decode_option` reports for a malformed known option.
fn invalid(option: u32, err: DecodeError) -> Result<ClientOption, InvalidOption> {
    Err(InvalidOption {
        option,
        message: err.to_string(),
    })
}

fn go(name: &str, info_requests: &[u16]) -> GoRequest {
    GoRequest {
        name: name.to_owned(),
        info_requests: info_requests.to_vec(),
    }
}

fn meta(export: &str, queries: &[&str]) -> MetaContextRequest {
    MetaContextRequest {
        export: export.to_owned(),
        queries: queries.iter().map(|q| (*q).to_owned()).collect(),
    }
}

/// A u32 length field followed by the string bytes.
fn lstr32(s: &[u8]) -> Vec<u8> {
    let len = u32::try_from(s.len()).expect("test strings are short");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

const COOKIE: u64 = 0x0102_0304_0506_0708;
const COOKIE_HEX: &str = "0102030405060708";

// ================================================================ constants
// "Values" section: every number the crate puts on the wire.

#[test]
fn magic_numbers_match_spec() {
    assert_eq!(INIT_PASSWD.to_be_bytes(), *b"NBDMAGIC");
    assert_eq!(IHAVEOPT.to_be_bytes(), *b"IHAVEOPT");
    assert_eq!(OPTION_REPLY_MAGIC, 0x0003_e889_0455_65a9);
    assert_eq!(REQUEST_MAGIC, 0x2560_9513);
    assert_eq!(EXTENDED_REQUEST_MAGIC, 0x21e4_1c71);
    assert_eq!(SIMPLE_REPLY_MAGIC, 0x6744_6698);
    assert_eq!(STRUCTURED_REPLY_MAGIC, 0x668e_33ef);
}

#[test]
fn flag_values_match_spec() {
    // Handshake flags and client flags.
    assert_eq!(FLAG_FIXED_NEWSTYLE, 0x0001);
    assert_eq!(FLAG_NO_ZEROES, 0x0002);
    assert_eq!(FLAG_C_FIXED_NEWSTYLE, 0x0000_0001);
    assert_eq!(FLAG_C_NO_ZEROES, 0x0000_0002);
    // Transmission flags, bits 0..=11.
    let transmission = [
        FLAG_HAS_FLAGS,
        FLAG_READ_ONLY,
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_ROTATIONAL,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_DF,
        FLAG_CAN_MULTI_CONN,
        FLAG_SEND_RESIZE,
        FLAG_SEND_CACHE,
        FLAG_SEND_FAST_ZERO,
    ];
    for (bit, flag) in transmission.into_iter().enumerate() {
        assert_eq!(flag, 1 << bit, "transmission flag bit {bit}");
    }
    // Command flags, bits 0..=4.
    let command = [
        CMD_FLAG_FUA,
        CMD_FLAG_NO_HOLE,
        CMD_FLAG_DF,
        CMD_FLAG_REQ_ONE,
        CMD_FLAG_FAST_ZERO,
    ];
    for (bit, flag) in command.into_iter().enumerate() {
        assert_eq!(flag, 1 << bit, "command flag bit {bit}");
    }
    assert_eq!(CMD_FLAGS_KNOWN, 0x001f);
    assert_eq!(REPLY_FLAG_DONE, 0x0001);
    // base:allocation states.
    assert_eq!(STATE_HOLE, 1);
    assert_eq!(STATE_ZERO, 2);
}

#[test]
fn option_and_reply_codes_match_spec() {
    let options = [
        (OPT_EXPORT_NAME, 1),
        (OPT_ABORT, 2),
        (OPT_LIST, 3),
        (OPT_PEEK_EXPORT, 4),
        (OPT_STARTTLS, 5),
        (OPT_INFO, 6),
        (OPT_GO, 7),
        (OPT_STRUCTURED_REPLY, 8),
        (OPT_LIST_META_CONTEXT, 9),
        (OPT_SET_META_CONTEXT, 10),
        (OPT_EXTENDED_HEADERS, 11),
    ];
    for (have, want) in options {
        assert_eq!(have, want);
    }
    assert_eq!(
        [REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT],
        [1, 2, 3, 4]
    );
    let errors = [
        REP_ERR_UNSUP,
        REP_ERR_POLICY,
        REP_ERR_INVALID,
        REP_ERR_PLATFORM,
        REP_ERR_TLS_REQD,
        REP_ERR_UNKNOWN,
        REP_ERR_SHUTDOWN,
        REP_ERR_BLOCK_SIZE_REQD,
        REP_ERR_TOO_BIG,
    ];
    for (i, code) in errors.into_iter().enumerate() {
        let n = u32::try_from(i).expect("nine codes") + 1;
        assert_eq!(code, (1u32 << 31) + n, "NBD_REP_ERR 2^31 + {n}");
    }
    assert_eq!(
        [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
        [0, 1, 2, 3]
    );
}

#[test]
fn command_reply_and_errno_codes_match_spec() {
    assert_eq!(
        [
            CMD_READ,
            CMD_WRITE,
            CMD_DISC,
            CMD_FLUSH,
            CMD_TRIM,
            CMD_CACHE,
            CMD_WRITE_ZEROES,
            CMD_BLOCK_STATUS
        ],
        [0, 1, 2, 3, 4, 5, 6, 7]
    );
    assert_eq!(REPLY_TYPE_NONE, 0);
    assert_eq!(REPLY_TYPE_OFFSET_DATA, 1);
    assert_eq!(REPLY_TYPE_OFFSET_HOLE, 2);
    assert_eq!(REPLY_TYPE_BLOCK_STATUS, 5);
    assert_eq!(REPLY_TYPE_ERROR, (1 << 15) + 1);
    assert_eq!(REPLY_TYPE_ERROR_OFFSET, (1 << 15) + 2);
    assert_eq!(
        [
            EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN
        ],
        [1, 5, 12, 22, 28, 75, 95, 108]
    );
}

#[test]
fn fixed_message_sizes_match_spec() {
    assert_eq!(GREETING_BYTES, 8 + 8 + 2);
    assert_eq!(CLIENT_FLAGS_BYTES, 4);
    assert_eq!(OPTION_HEADER_BYTES, 8 + 4 + 4);
    assert_eq!(OPTION_REPLY_HEADER_BYTES, 8 + 4 + 4 + 4);
    assert_eq!(EXPORT_NAME_REPLY_BYTES, 8 + 2);
    assert_eq!(EXPORT_NAME_ZERO_PAD_BYTES, 124);
    assert_eq!(REQUEST_BYTES, 4 + 2 + 2 + 8 + 8 + 4);
    assert_eq!(SIMPLE_REPLY_BYTES, 4 + 4 + 8);
    assert_eq!(CHUNK_HEADER_BYTES, 4 + 2 + 2 + 8 + 4);
    assert_eq!(OFFSET_DATA_HEADER_BYTES, 20 + 8);
    assert_eq!(MAX_STRING_BYTES, 4096);
}

// ================================================================ greeting
// "Newstyle negotiation": NBDMAGIC, IHAVEOPT, 16 bits handshake flags.

#[test]
fn greeting_encodes() {
    let expected = hex(&[
        "4e42444d41474943", // NBDMAGIC
        "49484156454f5054", // IHAVEOPT
        "0003",             // handshake flags: FIXED_NEWSTYLE | NO_ZEROES
    ]);
    assert_eq!(
        enc(|o| encode_greeting(o, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)),
        expected
    );
    assert_eq!(expected.len(), GREETING_BYTES);
}

#[test]
fn greeting_decodes() {
    let wire = hex(&["4e42444d41474943", "49484156454f5054", "0001"]);
    assert_eq!(decode_greeting(&wire), Ok(FLAG_FIXED_NEWSTYLE));
    // Unknown handshake flags are the client's to ignore; the decoder hands them through.
    let wire = hex(&["4e42444d41474943", "49484156454f5054", "8003"]);
    assert_eq!(decode_greeting(&wire), Ok(0x8003));
}

#[test]
fn greeting_bad_magics() {
    let wire = hex(&["4e42444d41474944", "49484156454f5054", "0003"]);
    assert_eq!(
        decode_greeting(&wire),
        Err(DecodeError::BadMagic {
            expected: INIT_PASSWD,
            found: 0x4e42_444d_4147_4944
        })
    );
    // An oldstyle server sends cliserv_magic where newstyle has IHAVEOPT.
    let wire = hex(&["4e42444d41474943", "0000420281861253", "0003"]);
    assert_eq!(
        decode_greeting(&wire),
        Err(DecodeError::BadMagic {
            expected: IHAVEOPT,
            found: 0x0000_4202_8186_1253
        })
    );
}

#[test]
fn greeting_truncated() {
    let wire = hex(&["4e42444d41474943", "49484156454f5054", "00"]);
    assert_eq!(
        decode_greeting(&wire),
        Err(DecodeError::Truncated { need: 18, have: 17 })
    );
    assert_eq!(
        decode_greeting(&[]),
        Err(DecodeError::Truncated { need: 8, have: 0 })
    );
}

// ================================================================ client flags
// "Client flags": bit 0 C_FIXED_NEWSTYLE, bit 1 C_NO_ZEROES; anything else, or a flag the
// server did not advertise, means the server drops the connection.

const OFFER_BOTH: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

#[test]
fn client_flags_decode() {
    let cases = [
        ("00000000", false, false),
        ("00000001", true, false),
        ("00000002", false, true),
        ("00000003", true, true),
    ];
    for (wire, fixed_newstyle, no_zeroes) in cases {
        assert_eq!(
            decode_client_flags(&hex(&[wire]), OFFER_BOTH),
            Ok(ClientFlags {
                fixed_newstyle,
                no_zeroes
            }),
            "{wire}"
        );
    }
}

#[test]
fn client_flags_encode() {
    let cases = [
        (false, false, "00000000"),
        (true, false, "00000001"),
        (false, true, "00000002"),
        (true, true, "00000003"),
    ];
    for (fixed_newstyle, no_zeroes, wire) in cases {
        let flags = ClientFlags {
            fixed_newstyle,
            no_zeroes,
        };
        assert_eq!(enc(|o| encode_client_flags(o, flags)), hex(&[wire]));
    }
}

#[test]
fn client_flags_no_zeroes_not_offered() {
    assert_eq!(
        decode_client_flags(&hex(&["00000003"]), FLAG_FIXED_NEWSTYLE),
        Err(DecodeError::UnknownClientFlags(FLAG_C_NO_ZEROES))
    );
    assert_eq!(
        decode_client_flags(&hex(&["00000002"]), FLAG_FIXED_NEWSTYLE),
        Err(DecodeError::UnknownClientFlags(FLAG_C_NO_ZEROES))
    );
}

/// Regression: C_FIXED_NEWSTYLE was accepted even when the server had not advertised
/// FIXED_NEWSTYLE, although the spec says a client flag that does not match something the
/// server advertised must make the server drop the connection.
#[test]
fn client_flags_fixed_newstyle_not_offered() {
    assert_eq!(
        decode_client_flags(&hex(&["00000001"]), 0),
        Err(DecodeError::UnknownClientFlags(FLAG_C_FIXED_NEWSTYLE))
    );
    assert_eq!(
        decode_client_flags(&hex(&["00000003"]), FLAG_NO_ZEROES),
        Err(DecodeError::UnknownClientFlags(FLAG_C_FIXED_NEWSTYLE))
    );
    assert_eq!(
        decode_client_flags(&hex(&["00000000"]), 0),
        Ok(ClientFlags::default())
    );
}

#[test]
fn client_flags_unknown_bits() {
    let cases = [
        ("00000004", 0x0000_0004),
        ("80000001", 0x8000_0000),
        ("ffffffff", 0xffff_fffc),
    ];
    for (wire, unknown) in cases {
        assert_eq!(
            decode_client_flags(&hex(&[wire]), OFFER_BOTH),
            Err(DecodeError::UnknownClientFlags(unknown)),
            "{wire}"
        );
    }
}

#[test]
fn client_flags_truncated() {
    assert_eq!(
        decode_client_flags(&hex(&["000000"]), OFFER_BOTH),
        Err(DecodeError::Truncated { need: 4, have: 3 })
    );
}

// ================================================================ option header
// "Newstyle negotiation": IHAVEOPT, 32 bits option, 32 bits length, data.

#[test]
fn option_header_decodes() {
    let wire = hex(&[
        "49484156454f5054", // IHAVEOPT
        "00000007",         // NBD_OPT_GO
        "0000000c",         // 12 bytes of data follow
    ]);
    assert_eq!(
        decode_option_header(&wire),
        Ok(OptionHeader {
            option: OPT_GO,
            len: 12
        })
    );
    // Only the first 16 bytes are the header; the data after it is not looked at.
    let mut longer = wire.clone();
    longer.extend_from_slice(&hex(&["000000000000"]));
    assert_eq!(decode_option_header(&longer), decode_option_header(&wire));
}

#[test]
fn option_header_bad_magic_and_truncated() {
    let wire = hex(&["4e42444d41474943", "00000007", "00000000"]);
    assert_eq!(
        decode_option_header(&wire),
        Err(DecodeError::BadMagic {
            expected: IHAVEOPT,
            found: INIT_PASSWD
        })
    );
    let wire = hex(&["49484156454f5054", "00000007", "000000"]);
    assert_eq!(
        decode_option_header(&wire),
        Err(DecodeError::Truncated { need: 16, have: 15 })
    );
}

#[test]
fn option_encodes() {
    assert_eq!(
        enc(|o| encode_option(o, OPT_LIST, &[])),
        hex(&[
            "49484156454f5054", // IHAVEOPT
            "00000003",         // NBD_OPT_LIST
            "00000000",         // no data
        ])
    );
    assert_eq!(
        enc(|o| encode_option(o, OPT_EXPORT_NAME, b"disk")),
        hex(&[
            "49484156454f5054", // IHAVEOPT
            "00000001",         // NBD_OPT_EXPORT_NAME
            "00000004",         // length
            "6469736b",         // "disk"
        ])
    );
}

// ================================================================ option data
// "Option types".

#[test]
fn opt_export_name() {
    let ok = [
        (hex(&["6469736b"]), "disk"),
        (Vec::new(), ""), // the "default" export
        (hex(&["c3a9"]), "\u{e9}"),
    ];
    for (data, name) in ok {
        assert_eq!(
            decode_option(OPT_EXPORT_NAME, &data),
            Ok(ClientOption::ExportName(name.to_owned()))
        );
    }
    let longest = vec![b'a'; 4096];
    assert_eq!(
        decode_option(OPT_EXPORT_NAME, &longest),
        Ok(ClientOption::ExportName("a".repeat(4096)))
    );
}

#[test]
fn opt_export_name_bad_strings() {
    let bad = [
        hex(&["64006b"]),     // "d\0k": NUL
        hex(&["ff"]),         // not UTF-8
        hex(&["c3"]),         // truncated UTF-8 sequence
        vec![b'a'; 4097],     // longer than 4096 bytes
        hex(&["6469736b00"]), // NUL terminated
    ];
    for data in bad {
        assert_eq!(
            decode_option(OPT_EXPORT_NAME, &data),
            invalid(OPT_EXPORT_NAME, DecodeError::BadString("export name")),
            "{data:02x?}"
        );
    }
}

#[test]
fn opt_abort_ignores_data() {
    assert_eq!(decode_option(OPT_ABORT, &[]), Ok(ClientOption::Abort));
    // "a server SHOULD ignore any data sent by the client rather than rejecting the request"
    assert_eq!(
        decode_option(OPT_ABORT, &hex(&["deadbeef"])),
        Ok(ClientOption::Abort)
    );
}

#[test]
fn opts_without_data() {
    let cases = [
        (OPT_LIST, ClientOption::List),
        (OPT_STARTTLS, ClientOption::StartTls),
        (OPT_STRUCTURED_REPLY, ClientOption::StructuredReply),
    ];
    for (option, expected) in cases {
        assert_eq!(decode_option(option, &[]), Ok(expected));
        // "The client MUST NOT send any additional data ... NBD_REP_ERR_INVALID"
        assert_eq!(
            decode_option(option, &hex(&["00"])),
            invalid(option, DecodeError::BadLength("this option takes no data"))
        );
    }
}

#[test]
fn opt_unknown_and_unsupported() {
    for option in [
        0,
        OPT_PEEK_EXPORT,
        OPT_EXTENDED_HEADERS,
        12,
        0x8000_0000,
        u32::MAX,
    ] {
        assert_eq!(
            decode_option(option, &[]),
            Ok(ClientOption::Unsupported(option))
        );
        assert_eq!(
            decode_option(option, &hex(&["deadbeef"])),
            Ok(ClientOption::Unsupported(option))
        );
    }
}

// ---------------------------------------------------------------- INFO and GO

fn go_data() -> Vec<u8> {
    hex(&[
        "00000004", // length of name
        "6469736b", // "disk"
        "0002",     // two information requests
        "0003",     // NBD_INFO_BLOCK_SIZE
        "0001",     // NBD_INFO_NAME
    ])
}

#[test]
fn opt_info_and_go_decode() {
    let req = go("disk", &[INFO_BLOCK_SIZE, INFO_NAME]);
    assert_eq!(
        decode_option(OPT_GO, &go_data()),
        Ok(ClientOption::Go(req.clone()))
    );
    assert_eq!(
        decode_option(OPT_INFO, &go_data()),
        Ok(ClientOption::Info(req.clone()))
    );
    assert!(req.wants(INFO_BLOCK_SIZE));
    assert!(!req.wants(INFO_DESCRIPTION));
    // Default export, empty list: name length 0, count 0.
    assert_eq!(
        decode_option(OPT_GO, &hex(&["00000000", "0000"])),
        Ok(ClientOption::Go(go("", &[])))
    );
    // Requests the server does not understand are passed through for it to ignore.
    assert_eq!(
        decode_option(OPT_GO, &hex(&["00000000", "0001", "ffff"])),
        Ok(ClientOption::Go(go("", &[0xffff])))
    );
}

#[test]
fn go_request_encodes() {
    assert_eq!(
        go("disk", &[INFO_BLOCK_SIZE, INFO_NAME]).encode(),
        go_data()
    );
    assert_eq!(go("", &[]).encode(), hex(&["00000000", "0000"]));
}

#[test]
fn opt_go_name_length_exceeds_option_length() {
    let err = DecodeError::BadLength("export name length exceeds option length - 6");
    let cases = [
        // 10 bytes of data: name length 5 > 10 - 6.
        hex(&["00000005", "6469736b", "0000"]),
        // Enough bytes for a 6-byte name, but then no room for the count.
        hex(&["00000006", "6469736b", "0000"]),
        hex(&["ffffffff", "0000"]),
        // 5 bytes: shorter than the fixed part, any name is too long.
        hex(&["00000001", "64"]),
    ];
    for data in cases {
        for option in [OPT_GO, OPT_INFO] {
            assert_eq!(
                decode_option(option, &data),
                invalid(option, err.clone()),
                "{data:02x?}"
            );
        }
    }
}

#[test]
fn opt_go_info_count_mismatch() {
    let err = DecodeError::BadLength("information request count does not match length");
    let cases = [
        hex(&["00000004", "6469736b", "0002", "0003"]), // one request missing
        hex(&["00000004", "6469736b", "0001", "0003", "0001"]), // one extra
        hex(&["00000004", "6469736b", "0000", "00"]),   // a stray byte
    ];
    for data in cases {
        assert_eq!(
            decode_option(OPT_GO, &data),
            invalid(OPT_GO, err.clone()),
            "{data:02x?}"
        );
    }
}

#[test]
fn opt_go_too_many_info_requests() {
    let mut data = hex(&["00000000", "0041"]); // 65 requests
    data.extend(std::iter::repeat_n(0u8, 2 * 65));
    assert_eq!(
        decode_option(OPT_GO, &data),
        invalid(OPT_GO, DecodeError::TooMany("information requests"))
    );
    let mut data = hex(&["00000000", "0040"]); // 64 is the limit
    data.extend(std::iter::repeat_n(0u8, 2 * 64));
    assert_eq!(
        decode_option(OPT_GO, &data),
        Ok(ClientOption::Go(go("", &[0; 64])))
    );
}

#[test]
fn opt_go_truncated() {
    assert_eq!(
        decode_option(OPT_GO, &hex(&["000000"])),
        invalid(OPT_GO, DecodeError::Truncated { need: 4, have: 3 })
    );
    assert_eq!(
        decode_option(OPT_GO, &hex(&["00000000", "00"])),
        invalid(OPT_GO, DecodeError::Truncated { need: 6, have: 5 })
    );
}

#[test]
fn opt_go_bad_names() {
    let mut too_long = lstr32(&[b'a'; 4097]);
    too_long.extend_from_slice(&hex(&["0000"]));
    let cases = [
        hex(&["00000003", "64006b", "0000"]), // NUL
        hex(&["00000001", "ff", "0000"]),     // not UTF-8
        too_long,
    ];
    for data in cases {
        assert_eq!(
            decode_option(OPT_INFO, &data),
            invalid(OPT_INFO, DecodeError::BadString("export name"))
        );
    }
    let mut longest = lstr32(&[b'a'; 4096]);
    longest.extend_from_slice(&hex(&["0000"]));
    assert_eq!(
        decode_option(OPT_INFO, &longest),
        Ok(ClientOption::Info(go(&"a".repeat(4096), &[])))
    );
}

// ---------------------------------------------------------------- LIST/SET_META_CONTEXT

fn meta_data() -> Vec<u8> {
    hex(&[
        "00000004",                       // length of export name
        "6469736b",                       // "disk"
        "00000002",                       // two queries
        "00000002",                       // length of query
        "613a",                           // "a:"
        "0000000f",                       // length of query
        "626173653a616c6c6f636174696f6e", // "base:allocation"
    ])
}

#[test]
fn opt_meta_context_decodes() {
    let req = meta("disk", &["a:", META_BASE_ALLOCATION]);
    assert_eq!(
        decode_option(OPT_LIST_META_CONTEXT, &meta_data()),
        Ok(ClientOption::ListMetaContext(req.clone()))
    );
    assert_eq!(
        decode_option(OPT_SET_META_CONTEXT, &meta_data()),
        Ok(ClientOption::SetMetaContext(req))
    );
    // Zero queries: LIST means "all", SET means "none"; both decode the same.
    assert_eq!(
        decode_option(OPT_SET_META_CONTEXT, &hex(&["00000000", "00000000"])),
        Ok(ClientOption::SetMetaContext(meta("", &[])))
    );
    // An empty query string is syntactically fine (semantics are the server's business).
    assert_eq!(
        decode_option(
            OPT_LIST_META_CONTEXT,
            &hex(&["00000000", "00000001", "00000000"])
        ),
        Ok(ClientOption::ListMetaContext(meta("", &[""])))
    );
}

#[test]
fn meta_context_request_encodes() {
    assert_eq!(
        meta("disk", &["a:", META_BASE_ALLOCATION]).encode(),
        meta_data()
    );
    assert_eq!(meta("", &[]).encode(), hex(&["00000000", "00000000"]));
}

#[test]
fn opt_meta_context_trailing_bytes() {
    let mut data = meta_data();
    data.push(0);
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        assert_eq!(
            decode_option(option, &data),
            invalid(
                option,
                DecodeError::BadLength("trailing bytes after metadata context queries")
            )
        );
    }
}

#[test]
fn opt_meta_context_lengths_past_end() {
    // "a query length that would require reading beyond the original length" -> INVALID.
    let cases = [
        (
            hex(&[
                "00000000",
                "00000001",
                "00000010",                       // claims 16 bytes
                "626173653a616c6c6f636174696f6e", // 15 present
            ]),
            DecodeError::Truncated { need: 28, have: 27 },
        ),
        (
            hex(&["00000005", "6469736b"]), // export name runs past the end
            DecodeError::Truncated { need: 9, have: 8 },
        ),
        (
            hex(&["00000000"]), // no query count
            DecodeError::Truncated { need: 8, have: 4 },
        ),
        (
            hex(&["00000000", "00000002", "00000002", "613a"]), // second query missing
            DecodeError::Truncated { need: 18, have: 14 },
        ),
    ];
    for (data, err) in cases {
        assert_eq!(
            decode_option(OPT_SET_META_CONTEXT, &data),
            invalid(OPT_SET_META_CONTEXT, err)
        );
    }
}

#[test]
fn opt_meta_context_too_many_queries() {
    assert_eq!(
        decode_option(OPT_LIST_META_CONTEXT, &hex(&["00000000", "00000081"])),
        invalid(
            OPT_LIST_META_CONTEXT,
            DecodeError::TooMany("metadata context queries")
        )
    );
    assert_eq!(
        decode_option(OPT_LIST_META_CONTEXT, &hex(&["00000000", "ffffffff"])),
        invalid(
            OPT_LIST_META_CONTEXT,
            DecodeError::TooMany("metadata context queries")
        )
    );
    // 128 is the limit.
    let mut data = hex(&["00000000", "00000080"]);
    for _ in 0..128 {
        data.extend_from_slice(&hex(&["00000002", "613a"]));
    }
    assert_eq!(
        decode_option(OPT_LIST_META_CONTEXT, &data),
        Ok(ClientOption::ListMetaContext(meta("", &["a:"; 128])))
    );
}

#[test]
fn opt_meta_context_bad_strings() {
    let query_err = DecodeError::BadString("metadata context query");
    let export_err = DecodeError::BadString("export name");
    let mut long_query = hex(&["00000000", "00000001"]);
    long_query.extend_from_slice(&lstr32(&[b'a'; 4097]));
    let mut long_export = lstr32(&[b'a'; 4097]);
    long_export.extend_from_slice(&hex(&["00000000"]));
    let cases = [
        (
            hex(&["00000000", "00000001", "00000002", "6100"]),
            query_err.clone(),
        ),
        (
            hex(&["00000000", "00000001", "00000002", "61ff"]),
            query_err.clone(),
        ),
        (long_query, query_err),
        (hex(&["00000001", "00", "00000000"]), export_err.clone()),
        (hex(&["00000001", "80", "00000000"]), export_err.clone()),
        (long_export, export_err),
    ];
    for (data, err) in cases {
        assert_eq!(
            decode_option(OPT_SET_META_CONTEXT, &data),
            invalid(OPT_SET_META_CONTEXT, err)
        );
    }
}

// ================================================================ option replies
// "Fixed newstyle negotiation": reply magic, option, reply type, length, data.

const REPLY_MAGIC_HEX: &str = "0003e889045565a9";

#[test]
fn rep_ack() {
    let expected = hex(&[
        REPLY_MAGIC_HEX, // 0x3e889045565a9
        "00000007",      // NBD_OPT_GO
        "00000001",      // NBD_REP_ACK
        "00000000",      // no data
    ]);
    assert_eq!(enc(|o| encode_rep_ack(o, OPT_GO)), expected);
    let header = decode_option_reply_header(&expected).expect("ACK header decodes");
    assert_eq!(
        header,
        OptionReplyHeader {
            option: OPT_GO,
            reply_type: REP_ACK,
            len: 0
        }
    );
    assert!(!header.is_error());
}

#[test]
fn option_reply_header_errors() {
    let wire = hex(&["0003e889045565aa", "00000007", "00000001", "00000000"]);
    assert_eq!(
        decode_option_reply_header(&wire),
        Err(DecodeError::BadMagic {
            expected: OPTION_REPLY_MAGIC,
            found: 0x0003_e889_0455_65aa
        })
    );
    let wire = hex(&[REPLY_MAGIC_HEX, "00000007", "00000001", "000000"]);
    assert_eq!(
        decode_option_reply_header(&wire),
        Err(DecodeError::Truncated { need: 20, have: 19 })
    );
}

#[test]
fn option_reply_raw() {
    assert_eq!(
        enc(|o| encode_option_reply(o, OPT_GO, REP_INFO, &hex(&["0004"]))),
        hex(&[REPLY_MAGIC_HEX, "00000007", "00000003", "00000002", "0004"])
    );
}

// ---------------------------------------------------------------- NBD_REP_SERVER

#[test]
fn rep_server() {
    let expected = hex(&[
        REPLY_MAGIC_HEX,
        "00000003",           // NBD_OPT_LIST
        "00000002",           // NBD_REP_SERVER
        "00000011",           // 4 + 4 + 9
        "00000004",           // length of name: the name only
        "6469736b",           // "disk"
        "74657374206469736b", // "test disk": the rest is the description
    ]);
    assert_eq!(
        enc(|o| encode_rep_server(o, OPT_LIST, "disk", "test disk")),
        expected
    );
    assert_eq!(
        decode_rep_server(&expected[20..]),
        Ok(("disk".to_owned(), "test disk".to_owned()))
    );
}

#[test]
fn rep_server_without_description() {
    let expected = hex(&[
        REPLY_MAGIC_HEX,
        "00000003", // NBD_OPT_LIST
        "00000002", // NBD_REP_SERVER
        "00000008", // 4 + 4
        "00000004", // length of name == reply length - 4
        "6469736b", // "disk"
    ]);
    assert_eq!(
        enc(|o| encode_rep_server(o, OPT_LIST, "disk", "")),
        expected
    );
    assert_eq!(
        decode_rep_server(&expected[20..]),
        Ok(("disk".to_owned(), String::new()))
    );
    let expected = hex(&[
        REPLY_MAGIC_HEX,
        "00000003",
        "00000002",
        "00000004",
        "00000000",
    ]);
    assert_eq!(enc(|o| encode_rep_server(o, OPT_LIST, "", "")), expected);
}

#[test]
fn rep_server_clips_strings() {
    let name = "a".repeat(5000);
    let wire = enc(|o| encode_rep_server(o, OPT_LIST, &name, "d"));
    assert_eq!(&wire[16..20], hex(&["00001005"]).as_slice()); // 4 + 4096 + 1
    assert_eq!(&wire[20..24], hex(&["00001000"]).as_slice()); // name clipped to 4096
    assert_eq!(wire.len(), 20 + 4 + 4096 + 1);
}

#[test]
fn rep_server_decode_errors() {
    assert_eq!(
        decode_rep_server(&hex(&["00000005", "6469736b"])),
        Err(DecodeError::BadLength(
            "export name length exceeds reply length - 4"
        ))
    );
    assert_eq!(
        decode_rep_server(&hex(&["000000"])),
        Err(DecodeError::Truncated { need: 4, have: 3 })
    );
    assert_eq!(
        decode_rep_server(&hex(&["00000002", "6400"])),
        Err(DecodeError::BadString("export name"))
    );
    assert_eq!(
        decode_rep_server(&hex(&["00000001", "64", "ff"])),
        Err(DecodeError::BadString("description"))
    );
    let mut long_desc = hex(&["00000000"]);
    long_desc.extend(std::iter::repeat_n(b'a', 4097));
    assert_eq!(
        decode_rep_server(&long_desc),
        Err(DecodeError::BadString("description"))
    );
}

// ---------------------------------------------------------------- NBD_REP_INFO

#[test]
fn rep_info_export() {
    let expected = hex(&[
        REPLY_MAGIC_HEX,
        "00000007",         // NBD_OPT_GO
        "00000003",         // NBD_REP_INFO
        "0000000c",         // length MUST be 12
        "0000",             // NBD_INFO_EXPORT
        "0000000040000000", // size: 1 GiB
        "000d",             // HAS_FLAGS | SEND_FLUSH | SEND_FUA
    ]);
    let flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    assert_eq!(
        enc(|o| encode_rep_info_export(o, OPT_GO, 1 << 30, flags)),
        expected
    );
    assert_eq!(
        decode_info(&expected[20..]),
        Ok(Info::Export {
            size: 1 << 30,
            flags
        })
    );
}

#[test]
fn rep_info_export_wrong_length() {
    let err = Err(DecodeError::BadLength("NBD_INFO_EXPORT must be 12 bytes"));
    assert_eq!(decode_info(&hex(&["0000", "0000000040000000", "00"])), err);
    assert_eq!(
        decode_info(&hex(&["0000", "0000000040000000", "000d", "00"])),
        err
    );
    assert_eq!(decode_info(&hex(&["0000"])), err);
}

#[test]
fn rep_info_name_and_description() {
    let expected = hex(&[
        REPLY_MAGIC_HEX,
        "00000006", // NBD_OPT_INFO
        "00000003", // NBD_REP_INFO
        "00000006", // 2 + 4
        "0001",     // NBD_INFO_NAME
        "6469736b", // "disk"
    ]);
    assert_eq!(enc(|o| encode_rep_info_name(o, OPT_INFO, "disk")), expected);
    assert_eq!(
        decode_info(&expected[20..]),
        Ok(Info::Name("disk".to_owned()))
    );

    let expected = hex(&[
        REPLY_MAGIC_HEX,
        "00000007",           // NBD_OPT_GO
        "00000003",           // NBD_REP_INFO
        "0000000b",           // 2 + 9
        "0002",               // NBD_INFO_DESCRIPTION
        "74657374206469736b", // "test disk"
    ]);
    assert_eq!(
        enc(|o| encode_rep_info_description(o, OPT_GO, "test disk")),
        expected
    );
    assert_eq!(
        decode_info(&expected[20..]),
        Ok(Info::Description("test disk".to_owned()))
    );
    // "The length MUST be at least 2": an empty string is exactly the type.
    assert_eq!(decode_info(&hex(&["0001"])), Ok(Info::Name(String::new())));
    assert_eq!(
        decode_info(&hex(&["0002"])),
        Ok(Info::Description(String::new()))
    );
}

#[test]
fn rep_info_strings_clipped_and_validated() {
    let wire = enc(|o| encode_rep_info_name(o, OPT_GO, &"n".repeat(5000)));
    assert_eq!(&wire[16..20], hex(&["00001002"]).as_slice()); // 2 + 4096
    assert_eq!(wire.len(), 20 + 2 + 4096);
    assert_eq!(
        decode_info(&hex(&["0001", "6400"])),
        Err(DecodeError::BadString("export name"))
    );
    assert_eq!(
        decode_info(&hex(&["0002", "ff"])),
        Err(DecodeError::BadString("description"))
    );
    let mut long = hex(&["0002"]);
    long.extend(std::iter::repeat_n(b'a', 4097));
    assert_eq!(
        decode_info(&long),
        Err(DecodeError::BadString("description"))
    );
}

#[test]
fn rep_info_block_size() {
    let expected = hex(&[
        REPLY_MAGIC_HEX,
        "00000007", // NBD_OPT_GO
        "00000003", // NBD_REP_INFO
        "0000000e", // length MUST be 14
        "0003",     // NBD_INFO_BLOCK_SIZE
        "00000001", // minimum block size
        "00001000", // preferred block size: 4096
        "02000000", // maximum payload size: 32 MiB
    ]);
    let bs = BlockSize {
        minimum: 1,
        preferred: 4096,
        maximum: 32 << 20,
    };
    assert_eq!(enc(|o| encode_rep_info_block_size(o, OPT_GO, bs)), expected);
    assert_eq!(decode_info(&expected[20..]), Ok(Info::BlockSize(bs)));
    let err = Err(DecodeError::BadLength(
        "NBD_INFO_BLOCK_SIZE must be 14 bytes",
    ));
    assert_eq!(
        decode_info(&hex(&["0003", "00000001", "00001000", "020000"])),
        err
    );
    assert_eq!(
        decode_info(&hex(&["0003", "00000001", "00001000", "02000000", "00"])),
        err
    );
}

#[test]
fn block_size_validation() {
    let ok = BlockSize {
        minimum: 1,
        preferred: 4096,
        maximum: 32 << 20,
    };
    assert_eq!(ok.validate(), Ok(()));
    let bad = [
        (BlockSize { minimum: 3, ..ok }, "minimum block size"),
        (
            BlockSize {
                minimum: 1 << 17,
                preferred: 1 << 17,
                maximum: 1 << 17,
            },
            "minimum block size",
        ),
        (
            BlockSize {
                preferred: 256,
                ..ok
            },
            "preferred block size",
        ),
        (
            BlockSize {
                preferred: 3000,
                ..ok
            },
            "preferred block size",
        ),
        (
            BlockSize {
                maximum: 2048,
                ..ok
            },
            "maximum payload size",
        ),
    ];
    for (bs, what) in bad {
        assert_eq!(bs.validate(), Err(DecodeError::Invalid(what)), "{bs:?}");
    }
}

#[test]
fn rep_info_unknown_and_truncated() {
    // "The client MUST ignore information replies it does not understand."
    assert_eq!(decode_info(&hex(&["0004"])), Ok(Info::Unknown(4)));
    assert_eq!(
        decode_info(&hex(&["ffff", "0102"])),
        Ok(Info::Unknown(0xffff))
    );
    assert_eq!(
        decode_info(&[]),
        Err(DecodeError::Truncated { need: 2, have: 0 })
    );
    assert_eq!(
        decode_info(&hex(&["00"])),
        Err(DecodeError::Truncated { need: 2, have: 1 })
    );
}

// ---------------------------------------------------------------- NBD_REP_META_CONTEXT

#[test]
fn rep_meta_context() {
    let expected = hex(&[
        REPLY_MAGIC_HEX,
        "0000000a",                       // NBD_OPT_SET_META_CONTEXT
        "00000004",                       // NBD_REP_META_CONTEXT
        "00000013",                       // 4 + 15
        "00000001",                       // context id
        "626173653a616c6c6f636174696f6e", // "base:allocation"
    ]);
    assert_eq!(
        enc(|o| encode_rep_meta_context(o, OPT_SET_META_CONTEXT, 1, META_BASE_ALLOCATION)),
        expected
    );
    assert_eq!(
        decode_rep_meta_context(&expected[20..]),
        Ok((1, META_BASE_ALLOCATION.to_owned()))
    );
}

#[test]
fn rep_meta_context_decode_errors() {
    assert_eq!(
        decode_rep_meta_context(&hex(&["000000"])),
        Err(DecodeError::Truncated { need: 4, have: 3 })
    );
    for name in ["80", "6100"] {
        assert_eq!(
            decode_rep_meta_context(&hex(&["00000001", name])),
            Err(DecodeError::BadString("metadata context name"))
        );
    }
}

// ---------------------------------------------------------------- error replies

#[test]
fn rep_error() {
    let expected = hex(&[
        REPLY_MAGIC_HEX,
        "00000007", // NBD_OPT_GO
        "80000006", // NBD_REP_ERR_UNKNOWN
        "00000003", // length of message
        "626164",   // "bad"
    ]);
    assert_eq!(
        enc(|o| encode_rep_error(o, OPT_GO, REP_ERR_UNKNOWN, "bad")),
        expected
    );
    let header = decode_option_reply_header(&expected).expect("error header decodes");
    assert!(header.is_error());
    assert_eq!(header.reply_type, REP_ERR_UNKNOWN);
    assert_eq!(header.len, 3);
    // Error replies "MAY have some data": an empty message is just the header.
    assert_eq!(
        enc(|o| encode_rep_error(o, 12, REP_ERR_UNSUP, "")),
        hex(&[REPLY_MAGIC_HEX, "0000000c", "80000001", "00000000"])
    );
}

#[test]
fn rep_error_message_clipped() {
    let wire = enc(|o| encode_rep_error(o, OPT_GO, REP_ERR_INVALID, &"x".repeat(600)));
    assert_eq!(&wire[12..20], hex(&["80000003", "00000200"]).as_slice());
    assert_eq!(&wire[20..], "x".repeat(512).as_bytes());
    // Clipping never splits a UTF-8 character: 511 ASCII bytes then a 2-byte 'é'.
    let message = format!("{}\u{e9}", "x".repeat(511));
    let wire = enc(|o| encode_rep_error(o, OPT_GO, REP_ERR_INVALID, &message));
    assert_eq!(&wire[16..20], hex(&["000001ff"]).as_slice());
    assert_eq!(&wire[20..], "x".repeat(511).as_bytes());
}

// ---------------------------------------------------------------- EXPORT_NAME reply

#[test]
fn export_name_reply_with_zeroes() {
    let mut expected = hex(&[
        "0000000040000000", // size: 1 GiB
        "0001",             // transmission flags: HAS_FLAGS
    ]);
    expected.extend_from_slice(&[0u8; 124]); // reserved zeroes
    let wire = enc(|o| encode_export_name_reply(o, 1 << 30, FLAG_HAS_FLAGS, false));
    assert_eq!(wire, expected);
    assert_eq!(wire.len(), 134);
    assert_eq!(
        decode_export_name_reply(&wire),
        Ok((1 << 30, FLAG_HAS_FLAGS))
    );
}

#[test]
fn export_name_reply_no_zeroes() {
    let expected = hex(&[
        "ffffffffffffffff", // size
        "0003",             // HAS_FLAGS | READ_ONLY
    ]);
    let wire =
        enc(|o| encode_export_name_reply(o, u64::MAX, FLAG_HAS_FLAGS | FLAG_READ_ONLY, true));
    assert_eq!(wire, expected);
    assert_eq!(decode_export_name_reply(&wire), Ok((u64::MAX, 0x0003)));
    assert_eq!(
        decode_export_name_reply(&wire[..9]),
        Err(DecodeError::Truncated { need: 10, have: 9 })
    );
}

// ================================================================ requests
// "Request message": magic, 16 bits flags, 16 bits type, 64 cookie, 64 offset, 32 length.

#[test]
fn request_write() {
    let wire = hex(&[
        "25609513",         // NBD_REQUEST_MAGIC
        "0001",             // command flags: FUA
        "0001",             // NBD_CMD_WRITE
        COOKIE_HEX,         // cookie
        "0000000000001000", // offset
        "00001000",         // length
    ]);
    let req = Request {
        flags: CMD_FLAG_FUA,
        command: Command::Write,
        cookie: COOKIE,
        offset: 4096,
        len: 4096,
    };
    assert_eq!(decode_request(&wire), Ok(req));
    assert_eq!(enc(|o| encode_request(o, &req)), wire);
    assert_eq!(wire.len(), REQUEST_BYTES);
    assert_eq!(req.payload_len(), 4096);
    assert!(req.has(CMD_FLAG_FUA));
    assert!(!req.has(CMD_FLAG_DF));
    // The WRITE payload that follows the header is not part of it.
    let mut with_payload = wire.clone();
    with_payload.extend_from_slice(&[0xaa; 16]);
    assert_eq!(decode_request(&with_payload), Ok(req));
}

#[test]
fn request_every_command() {
    let commands = [
        ("0000", Command::Read),
        ("0001", Command::Write),
        ("0002", Command::Disc),
        ("0003", Command::Flush),
        ("0004", Command::Trim),
        ("0005", Command::Cache),
        ("0006", Command::WriteZeroes),
        ("0007", Command::BlockStatus),
        ("0008", Command::Unknown(8)), // NBD_CMD_RESIZE: experimental, not known here
        ("ffff", Command::Unknown(0xffff)),
    ];
    for (ty, command) in commands {
        let wire = hex(&[
            "25609513",         // magic
            "0000",             // flags
            ty,                 // type
            "0000000000000000", // cookie
            "0000000000000200", // offset 512
            "00000200",         // length 512
        ]);
        let req = decode_request(&wire).expect("request decodes");
        assert_eq!(req.command, command, "{ty}");
        assert_eq!(enc(|o| encode_request(o, &req)), wire, "{ty}");
        let expected_payload = if command == Command::Write { 512 } else { 0 };
        assert_eq!(req.payload_len(), expected_payload, "{ty}");
    }
}

#[test]
fn request_cookie_and_large_fields() {
    let wire = hex(&[
        "25609513",
        "001f",             // every known flag
        "0006",             // NBD_CMD_WRITE_ZEROES
        "ffffffffffffffff", // cookie
        "fffffffffffffe00", // offset
        "ffffffff",         // length
    ]);
    assert_eq!(
        decode_request(&wire),
        Ok(Request {
            flags: CMD_FLAGS_KNOWN,
            command: Command::WriteZeroes,
            cookie: u64::MAX,
            offset: 0xffff_ffff_ffff_fe00,
            len: u32::MAX,
        })
    );
}

#[test]
fn request_bad_magic() {
    for (magic, found) in [
        ("21e41c71", EXTENDED_REQUEST_MAGIC), // extended headers are never negotiated
        ("12560953", 0x1256_0953),            // historic request magic
        ("67446698", SIMPLE_REPLY_MAGIC),
    ] {
        let wire = hex(&[
            magic,
            "0000",
            "0000",
            COOKIE_HEX,
            "0000000000000000",
            "00000200",
        ]);
        assert_eq!(
            decode_request(&wire),
            Err(DecodeError::BadMagic {
                expected: REQUEST_MAGIC.into(),
                found: found.into()
            })
        );
    }
}

#[test]
fn request_truncated() {
    let wire = hex(&[
        "25609513",
        "0000",
        "0000",
        COOKIE_HEX,
        "0000000000000000",
        "000002",
    ]);
    assert_eq!(
        decode_request(&wire),
        Err(DecodeError::Truncated { need: 28, have: 27 })
    );
    assert_eq!(
        decode_request(&[]),
        Err(DecodeError::Truncated { need: 4, have: 0 })
    );
}

#[test]
fn command_flags_allowed_per_spec() {
    // "Command flags": FUA is valid for all commands; NO_HOLE and FAST_ZERO only for
    // WRITE_ZEROES; DF only for READ; REQ_ONE only for BLOCK_STATUS.
    let cases = [
        (Command::Read, CMD_FLAG_FUA | CMD_FLAG_DF),
        (Command::Write, CMD_FLAG_FUA),
        (Command::Disc, CMD_FLAG_FUA),
        (Command::Flush, CMD_FLAG_FUA),
        (Command::Trim, CMD_FLAG_FUA),
        (Command::Cache, CMD_FLAG_FUA),
        (
            Command::WriteZeroes,
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        ),
        (Command::BlockStatus, CMD_FLAG_FUA | CMD_FLAG_REQ_ONE),
        (Command::Unknown(9), CMD_FLAG_FUA),
    ];
    for (command, allowed) in cases {
        assert_eq!(command.allowed_flags(), allowed, "{command:?}");
        assert_eq!(command.allowed_flags() & !CMD_FLAGS_KNOWN, 0);
        assert_eq!(Command::from_wire(command.to_wire()), command);
    }
}

// ================================================================ simple reply
// "Simple reply message": magic, 32 bits error, 64 bits cookie.

#[test]
fn simple_reply() {
    let ok = hex(&[
        "67446698", // NBD_SIMPLE_REPLY_MAGIC
        "00000000", // error: none
        COOKIE_HEX, // cookie
    ]);
    assert_eq!(enc(|o| encode_simple_reply(o, COOKIE, 0)), ok);
    assert_eq!(
        decode_simple_reply(&ok),
        Ok(SimpleReply {
            error: 0,
            cookie: COOKIE
        })
    );
    let eio = hex(&["67446698", "00000005", COOKIE_HEX]);
    assert_eq!(enc(|o| encode_simple_reply(o, COOKIE, EIO)), eio);
    assert_eq!(
        decode_simple_reply(&eio),
        Ok(SimpleReply {
            error: EIO,
            cookie: COOKIE
        })
    );
    assert_eq!(ok.len(), SIMPLE_REPLY_BYTES);
}

#[test]
fn simple_reply_errors() {
    for (magic, found) in [
        ("668e33ef", STRUCTURED_REPLY_MAGIC),
        ("96744668", 0x9674_4668), // historic reply magic
        ("6e8a278c", 0x6e8a_278c), // extended reply magic
    ] {
        assert_eq!(
            decode_simple_reply(&hex(&[magic, "00000000", COOKIE_HEX])),
            Err(DecodeError::BadMagic {
                expected: SIMPLE_REPLY_MAGIC.into(),
                found: found.into()
            })
        );
    }
    assert_eq!(
        decode_simple_reply(&hex(&["67446698", "00000000", "01020304050607"])),
        Err(DecodeError::Truncated { need: 16, have: 15 })
    );
}

#[test]
fn reply_kind() {
    assert_eq!(
        decode_reply_kind(&hex(&["67446698"])),
        Ok(ReplyKind::Simple)
    );
    assert_eq!(
        decode_reply_kind(&hex(&["668e33ef", "0001"])),
        Ok(ReplyKind::Structured)
    );
    assert_eq!(
        decode_reply_kind(&hex(&["25609513"])),
        Err(DecodeError::BadMagic {
            expected: SIMPLE_REPLY_MAGIC.into(),
            found: REQUEST_MAGIC.into()
        })
    );
    assert_eq!(
        decode_reply_kind(&hex(&["6744"])),
        Err(DecodeError::Truncated { need: 4, have: 2 })
    );
}

// ================================================================ structured chunks
// "Structured reply chunk message": magic, 16 flags, 16 type, 64 cookie, 32 length, payload.

#[test]
fn chunk_header() {
    let wire = hex(&[
        "668e33ef", // NBD_STRUCTURED_REPLY_MAGIC
        "0001",     // flags: DONE
        "0005",     // NBD_REPLY_TYPE_BLOCK_STATUS
        COOKIE_HEX, // cookie
        "00000014", // length of payload
    ]);
    assert_eq!(
        enc(|o| encode_chunk_header(o, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, COOKIE, 20)),
        wire
    );
    let header = decode_chunk_header(&wire).expect("chunk header decodes");
    assert_eq!(
        header,
        ChunkHeader {
            flags: REPLY_FLAG_DONE,
            ty: REPLY_TYPE_BLOCK_STATUS,
            cookie: COOKIE,
            len: 20
        }
    );
    assert!(header.is_done());
    assert!(!header.is_error());
    let err = decode_chunk_header(&hex(&["668e33ef", "0000", "8001", COOKIE_HEX, "00000006"]))
        .expect("error chunk header decodes");
    assert!(!err.is_done());
    assert!(err.is_error());
    // "Clients MUST ignore unrecognized flags": the decoder passes them through.
    let odd = decode_chunk_header(&hex(&["668e33ef", "fffe", "0000", COOKIE_HEX, "00000000"]))
        .expect("chunk header with unknown flags decodes");
    assert_eq!(odd.flags, 0xfffe);
    assert!(!odd.is_done());
}

#[test]
fn chunk_header_errors() {
    assert_eq!(
        decode_chunk_header(&hex(&["67446698", "0001", "0000", COOKIE_HEX, "00000000"])),
        Err(DecodeError::BadMagic {
            expected: STRUCTURED_REPLY_MAGIC.into(),
            found: SIMPLE_REPLY_MAGIC.into()
        })
    );
    assert_eq!(
        decode_chunk_header(&hex(&["668e33ef", "0001", "0000", COOKIE_HEX, "000000"])),
        Err(DecodeError::Truncated { need: 20, have: 19 })
    );
}

#[test]
fn chunk_none() {
    let wire = hex(&[
        "668e33ef", // magic
        "0001",     // DONE: MUST always be set for NONE
        "0000",     // NBD_REPLY_TYPE_NONE
        COOKIE_HEX, // cookie
        "00000000", // length MUST be 0
    ]);
    assert_eq!(enc(|o| encode_none_chunk(o, COOKIE)), wire);
    assert_eq!(wire.len(), CHUNK_HEADER_BYTES);
}

#[test]
fn chunk_offset_data() {
    let wire = hex(&[
        "668e33ef",         // magic
        "0001",             // DONE
        "0001",             // NBD_REPLY_TYPE_OFFSET_DATA
        COOKIE_HEX,         // cookie
        "00000208",         // length: 8 + 512 bytes of data
        "0000000000001000", // offset
    ]);
    assert_eq!(
        enc(|o| encode_offset_data_header(o, COOKIE, 0x1000, 512, true)),
        wire
    );
    assert_eq!(wire.len(), OFFSET_DATA_HEADER_BYTES);
    let not_done = hex(&[
        "668e33ef",
        "0000",
        "0001",
        COOKIE_HEX,
        "00000009",
        "ffffffffffffffff",
    ]);
    assert_eq!(
        enc(|o| encode_offset_data_header(o, COOKIE, u64::MAX, 1, false)),
        not_done
    );
    let payload = hex(&["0000000000001000", "aabb"]);
    assert_eq!(
        decode_offset_data(&payload),
        Ok((0x1000, hex(&["aabb"]).as_slice()))
    );
}

#[test]
fn chunk_offset_data_errors() {
    // "length MUST be at least 9"
    assert_eq!(
        decode_offset_data(&hex(&["0000000000001000"])),
        Err(DecodeError::BadLength("OFFSET_DATA chunk without data"))
    );
    assert_eq!(
        decode_offset_data(&hex(&["00000000000010"])),
        Err(DecodeError::Truncated { need: 8, have: 7 })
    );
}

#[test]
fn chunk_offset_hole() {
    let wire = hex(&[
        "668e33ef",         // magic
        "0000",             // not DONE
        "0002",             // NBD_REPLY_TYPE_OFFSET_HOLE
        COOKIE_HEX,         // cookie
        "0000000c",         // length MUST be 12
        "0000000000002000", // offset
        "00010000",         // hole size
    ]);
    assert_eq!(
        enc(|o| encode_offset_hole(o, COOKIE, 0x2000, 0x10000, false)),
        wire
    );
    assert_eq!(decode_offset_hole(&wire[20..]), Ok((0x2000, 0x10000)));
    let done = enc(|o| encode_offset_hole(o, COOKIE, 0, 1, true));
    assert_eq!(&done[4..6], hex(&["0001"]).as_slice());
}

#[test]
fn chunk_offset_hole_errors() {
    let err = Err(DecodeError::BadLength(
        "OFFSET_HOLE payload must be 12 bytes",
    ));
    assert_eq!(
        decode_offset_hole(&hex(&["0000000000002000", "000100"])),
        err
    );
    assert_eq!(
        decode_offset_hole(&hex(&["0000000000002000", "00010000", "00"])),
        err
    );
    assert_eq!(decode_offset_hole(&[]), err);
    // "hole size (unsigned, MUST be nonzero)"
    assert_eq!(
        decode_offset_hole(&hex(&["0000000000002000", "00000000"])),
        Err(DecodeError::Invalid("zero-length hole"))
    );
}

#[test]
fn chunk_block_status() {
    let wire = hex(&[
        "668e33ef", // magic
        "0001",     // DONE
        "0005",     // NBD_REPLY_TYPE_BLOCK_STATUS
        COOKIE_HEX, // cookie
        "00000014", // length: 4 + 2 * 8
        "00000001", // metadata context id
        "00010000", // extent length
        "00000000", // status: allocated data
        "00020000", // extent length
        "00000003", // status: HOLE | ZERO
    ]);
    let extents = [
        BlockStatusExtent {
            len: 0x10000,
            flags: 0,
        },
        BlockStatusExtent {
            len: 0x20000,
            flags: STATE_HOLE | STATE_ZERO,
        },
    ];
    assert_eq!(
        enc(|o| encode_block_status(o, COOKIE, 1, &extents, true)),
        wire
    );
    assert_eq!(decode_block_status(&wire[20..]), Ok((1, extents.to_vec())));
}

#[test]
fn chunk_block_status_bad_lengths() {
    // "length MUST be 4 + (a positive integer multiple of 8)"
    let err = Err(DecodeError::BadLength(
        "block status payload must be 4 + 8n bytes, n >= 1",
    ));
    assert_eq!(decode_block_status(&[]), err);
    assert_eq!(decode_block_status(&hex(&["00000001"])), err); // no descriptor
    assert_eq!(decode_block_status(&hex(&["00000001", "00001000"])), err);
    assert_eq!(
        decode_block_status(&hex(&["00000001", "00001000", "000000"])),
        err
    );
    assert_eq!(
        decode_block_status(&hex(&["00000001", "00001000", "00000000", "00"])),
        err
    );
}

#[test]
fn chunk_block_status_zero_length_descriptor() {
    let err = Err(DecodeError::Invalid("zero-length block status descriptor"));
    assert_eq!(
        decode_block_status(&hex(&["00000001", "00000000", "00000000"])),
        err
    );
    assert_eq!(
        decode_block_status(&hex(&[
            "00000001", "00001000", "00000000", "00000000", "00000001"
        ])),
        err
    );
}

#[test]
fn chunk_block_status_too_many_descriptors() {
    // "Servers SHOULD NOT send more than 2^20 extents in a single reply chunk."
    let mut at_limit = hex(&["00000001"]);
    at_limit.extend(std::iter::repeat_n([0, 0, 0x10, 0, 0, 0, 0, 0], 1 << 20).flatten());
    let (id, extents) = decode_block_status(&at_limit).expect("2^20 descriptors decode");
    assert_eq!(id, 1);
    assert_eq!(extents.len(), MAX_BLOCK_STATUS_EXTENTS);
    at_limit.extend_from_slice(&hex(&["00001000", "00000000"]));
    assert_eq!(
        decode_block_status(&at_limit),
        Err(DecodeError::TooMany("block status descriptors"))
    );
}

#[test]
fn chunk_error() {
    let wire = hex(&[
        "668e33ef",           // magic
        "0001",               // DONE
        "8001",               // NBD_REPLY_TYPE_ERROR
        COOKIE_HEX,           // cookie
        "0000000f",           // length: 6 + 9
        "00000005",           // error: EIO
        "0009",               // message length
        "492f4f206572726f72", // "I/O error"
    ]);
    assert_eq!(
        enc(|o| encode_error_chunk(o, COOKIE, EIO, "I/O error", true)),
        wire
    );
    assert_eq!(
        decode_error_chunk(REPLY_TYPE_ERROR, &wire[20..]),
        Ok(ChunkError {
            error: EIO,
            message: "I/O error".to_owned(),
            offset: None
        })
    );
    let empty = hex(&[
        "668e33ef", "0000", "8001", COOKIE_HEX, "00000006", "0000001c", "0000",
    ]);
    assert_eq!(
        enc(|o| encode_error_chunk(o, COOKIE, ENOSPC, "", false)),
        empty
    );
    assert_eq!(
        decode_error_chunk(REPLY_TYPE_ERROR, &empty[20..]),
        Ok(ChunkError {
            error: ENOSPC,
            message: String::new(),
            offset: None
        })
    );
}

#[test]
fn chunk_error_offset() {
    let wire = hex(&[
        "668e33ef",         // magic
        "0000",             // not DONE
        "8002",             // NBD_REPLY_TYPE_ERROR_OFFSET
        COOKIE_HEX,         // cookie
        "00000011",         // length: 14 + 3
        "00000016",         // error: EINVAL
        "0003",             // message length
        "626164",           // "bad"
        "0000000000003000", // offset
    ]);
    assert_eq!(
        enc(|o| encode_error_offset_chunk(o, COOKIE, EINVAL, "bad", 0x3000, false)),
        wire
    );
    assert_eq!(
        decode_error_chunk(REPLY_TYPE_ERROR_OFFSET, &wire[20..]),
        Ok(ChunkError {
            error: EINVAL,
            message: "bad".to_owned(),
            offset: Some(0x3000)
        })
    );
}

#[test]
fn chunk_error_with_error_zero() {
    // "32 bits: error (MUST be nonzero)"
    for ty in [REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET] {
        assert_eq!(
            decode_error_chunk(ty, &hex(&["00000000", "0000", "0000000000000000"])),
            Err(DecodeError::Invalid("error chunk with error 0"))
        );
    }
}

#[test]
fn chunk_error_bad_lengths() {
    // message length larger than header length - 6
    assert_eq!(
        decode_error_chunk(
            REPLY_TYPE_ERROR,
            &hex(&["00000005", "000a", "492f4f206572726f72"])
        ),
        Err(DecodeError::Truncated { need: 16, have: 15 })
    );
    // trailing bytes after a known layout
    assert_eq!(
        decode_error_chunk(REPLY_TYPE_ERROR, &hex(&["00000005", "0000", "00"])),
        Err(DecodeError::BadLength("trailing bytes in error chunk"))
    );
    assert_eq!(
        decode_error_chunk(
            REPLY_TYPE_ERROR_OFFSET,
            &hex(&["00000005", "0000", "0000000000003000", "00"])
        ),
        Err(DecodeError::BadLength("trailing bytes in error chunk"))
    );
    // ERROR_OFFSET: "length MUST be at least 14"
    assert_eq!(
        decode_error_chunk(
            REPLY_TYPE_ERROR_OFFSET,
            &hex(&["00000005", "0000", "00000000"])
        ),
        Err(DecodeError::Truncated { need: 14, have: 10 })
    );
    assert_eq!(
        decode_error_chunk(REPLY_TYPE_ERROR, &hex(&["000005"])),
        Err(DecodeError::Truncated { need: 4, have: 3 })
    );
    assert_eq!(
        decode_error_chunk(REPLY_TYPE_ERROR, &hex(&["00000005", "00"])),
        Err(DecodeError::Truncated { need: 6, have: 5 })
    );
}

#[test]
fn chunk_error_bad_messages() {
    let err = Err(DecodeError::BadString("error message"));
    assert_eq!(
        decode_error_chunk(REPLY_TYPE_ERROR, &hex(&["00000005", "0002", "6100"])),
        err
    );
    assert_eq!(
        decode_error_chunk(REPLY_TYPE_ERROR, &hex(&["00000005", "0001", "ff"])),
        err
    );
    // "message length MUST NOT exceed the 4096 bytes string length limit"
    let mut long = hex(&["00000005", "1001"]);
    long.extend(std::iter::repeat_n(b'a', 4097));
    assert_eq!(decode_error_chunk(REPLY_TYPE_ERROR, &long), err);
    let mut longest = hex(&["00000005", "1000"]);
    longest.extend(std::iter::repeat_n(b'a', 4096));
    assert!(decode_error_chunk(REPLY_TYPE_ERROR, &longest).is_ok());
}

#[test]
fn chunk_error_message_clipped() {
    let wire = enc(|o| encode_error_chunk(o, COOKIE, EIO, &"m".repeat(600), true));
    assert_eq!(&wire[16..20], hex(&["00000206"]).as_slice()); // 6 + 512
    assert_eq!(&wire[24..26], hex(&["0200"]).as_slice()); // message length 512
    assert_eq!(wire.len(), 20 + 6 + 512);
    let wire = enc(|o| encode_error_offset_chunk(o, COOKIE, EIO, &"m".repeat(600), 7, true));
    assert_eq!(&wire[16..20], hex(&["0000020e"]).as_slice()); // 14 + 512
    assert_eq!(
        &wire[wire.len() - 8..],
        hex(&["0000000000000007"]).as_slice()
    );
}

/// Regression: an error chunk of a type this crate does not know was rejected when it carried
/// structured fields after the message, although the spec says "The header length then covers
/// any remaining structured fields at the end" and the client "MAY continue transmission
/// unless it detects that message length is too large to fit".
#[test]
fn chunk_error_unknown_type_tolerates_trailing_fields() {
    let payload = hex(&["00000005", "0003", "626164", "deadbeef"]);
    assert_eq!(
        decode_error_chunk(0x8003, &payload),
        Ok(ChunkError {
            error: EIO,
            message: "bad".to_owned(),
            offset: None
        })
    );
    // The message must still fit.
    assert_eq!(
        decode_error_chunk(0x8003, &hex(&["00000005", "0004", "626164"])),
        Err(DecodeError::Truncated { need: 10, have: 9 })
    );
}

/// Regression: a non-error chunk type was decoded as if it were NBD_REPLY_TYPE_ERROR.
#[test]
fn chunk_error_rejects_non_error_types() {
    let payload = hex(&["00000005", "0000"]);
    for ty in [
        REPLY_TYPE_NONE,
        REPLY_TYPE_OFFSET_DATA,
        REPLY_TYPE_BLOCK_STATUS,
        0x7fff,
    ] {
        assert_eq!(
            decode_error_chunk(ty, &payload),
            Err(DecodeError::Invalid("not an error chunk type"))
        );
    }
}
