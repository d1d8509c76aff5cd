//! Client side: every decoder for what a server sends.
//!
//! The first input byte picks a mode:
//! - 0: a stream of option replies, each payload handed to the decoder for its reply type;
//! - 1: a stream of transmission replies (simple replies and structured chunks), each chunk
//!   payload handed to the decoder for its chunk type;
//! - 2: the rest as one payload, fed to every payload decoder, plus the fixed-size messages
//!   (greeting, EXPORT_NAME reply).
//!
//! Properties: no panic; every accepted message re-encodes to exactly the bytes it was
//! decoded from (the wire forms are canonical), and decoded values obey the spec's rules
//! (non-empty block status with non-zero lengths, non-zero errors, non-empty data).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::DecodeError;
use nbd_proto::consts::*;
use nbd_proto::handshake::*;
use nbd_proto::transmission::*;

/// Messages per input: bounds the work of one run.
const MAX_MESSAGES: usize = 32;
/// Largest payload the streams pass on; a real client would refuse bigger non-data chunks.
const MAX_PAYLOAD: u32 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => option_reply_stream(rest),
        1 => transmission_reply_stream(rest),
        _ => every_decoder(rest),
    }
});

fn encoded(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    f(&mut out);
    out
}

/// Splits `len` bytes of payload off `rest`, if they are all there and not too many.
fn take(rest: &[u8], len: u32) -> Option<(&[u8], &[u8])> {
    if len > MAX_PAYLOAD {
        return None;
    }
    let len = usize::try_from(len).ok()?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

// ---------------------------------------------------------------- option replies

fn option_reply_stream(mut rest: &[u8]) {
    for _ in 0..MAX_MESSAGES {
        let header = match decode_option_reply_header(rest) {
            Ok(h) => h,
            Err(e) => return check_fixed_error(&e, rest, OPTION_REPLY_MAGIC, 8, 20),
        };
        let mut wire = encoded(|o| encode_option_reply(o, header.option, header.reply_type, &[]));
        wire.truncate(16);
        assert_eq!(wire, rest[..16], "option reply header does not round trip");
        assert_eq!(header.len.to_be_bytes(), rest[16..20]);
        assert_eq!(header.is_error(), header.reply_type & (1 << 31) != 0);
        let Some((payload, next)) = take(&rest[OPTION_REPLY_HEADER_BYTES..], header.len) else {
            return;
        };
        match header.reply_type {
            REP_SERVER => check_rep_server(payload),
            REP_INFO => check_info(payload),
            REP_META_CONTEXT => check_rep_meta_context(payload),
            _ => {}
        }
        rest = next;
    }
}

fn check_info(payload: &[u8]) {
    let wire = match decode_info(payload) {
        Ok(Info::Export { size, flags }) => encoded(|o| encode_rep_info_export(o, 0, size, flags)),
        Ok(Info::Name(name)) => encoded(|o| encode_rep_info_name(o, 0, &name)),
        Ok(Info::Description(d)) => encoded(|o| encode_rep_info_description(o, 0, &d)),
        Ok(Info::BlockSize(bs)) => encoded(|o| encode_rep_info_block_size(o, 0, bs)),
        Ok(Info::Unknown(ty)) => {
            assert!(
                ty > INFO_BLOCK_SIZE,
                "known info type {ty} reported unknown"
            );
            assert_eq!(ty.to_be_bytes(), payload[..2]);
            return;
        }
        Err(_) => return,
    };
    assert_eq!(wire[20..], *payload, "info payload does not round trip");
}

fn check_rep_server(payload: &[u8]) {
    if let Ok((name, description)) = decode_rep_server(payload) {
        let wire = encoded(|o| encode_rep_server(o, OPT_LIST, &name, &description));
        assert_eq!(wire[20..], *payload, "NBD_REP_SERVER does not round trip");
    }
}

fn check_rep_meta_context(payload: &[u8]) {
    if let Ok((id, name)) = decode_rep_meta_context(payload) {
        let wire = encoded(|o| encode_rep_meta_context(o, OPT_SET_META_CONTEXT, id, &name));
        assert_eq!(
            wire[20..],
            *payload,
            "NBD_REP_META_CONTEXT does not round trip"
        );
    }
}

// ---------------------------------------------------------------- transmission replies

fn transmission_reply_stream(mut rest: &[u8]) {
    for _ in 0..MAX_MESSAGES {
        match decode_reply_kind(rest) {
            Ok(ReplyKind::Simple) => {
                let Ok(reply) = decode_simple_reply(rest) else {
                    assert!(rest.len() < SIMPLE_REPLY_BYTES);
                    return;
                };
                let wire = encoded(|o| encode_simple_reply(o, reply.cookie, reply.error));
                assert_eq!(
                    wire,
                    rest[..SIMPLE_REPLY_BYTES],
                    "simple reply does not round trip"
                );
                rest = &rest[SIMPLE_REPLY_BYTES..];
            }
            Ok(ReplyKind::Structured) => {
                let Ok(h) = decode_chunk_header(rest) else {
                    assert!(rest.len() < CHUNK_HEADER_BYTES);
                    return;
                };
                let wire = encoded(|o| encode_chunk_header(o, h.flags, h.ty, h.cookie, h.len));
                assert_eq!(
                    wire,
                    rest[..CHUNK_HEADER_BYTES],
                    "chunk header does not round trip"
                );
                assert_eq!(h.is_done(), h.flags & REPLY_FLAG_DONE != 0);
                assert_eq!(h.is_error(), h.ty & REPLY_TYPE_FLAG_ERROR != 0);
                let Some((payload, next)) = take(&rest[CHUNK_HEADER_BYTES..], h.len) else {
                    return;
                };
                check_chunk_payload(h.ty, payload);
                rest = next;
            }
            Err(e) => {
                assert!(decode_simple_reply(rest).is_err() && decode_chunk_header(rest).is_err());
                return check_fixed_error(&e, rest, u64::from(SIMPLE_REPLY_MAGIC), 4, 4);
            }
        }
    }
}

fn check_chunk_payload(ty: u16, payload: &[u8]) {
    match ty {
        REPLY_TYPE_NONE => {}
        REPLY_TYPE_OFFSET_DATA => check_offset_data(payload),
        REPLY_TYPE_OFFSET_HOLE => check_offset_hole(payload),
        REPLY_TYPE_BLOCK_STATUS => check_block_status(payload),
        ty if ty & REPLY_TYPE_FLAG_ERROR != 0 => check_error_chunk(ty, payload),
        _ => {}
    }
}

fn check_offset_data(payload: &[u8]) {
    if let Ok((offset, data)) = decode_offset_data(payload) {
        assert!(!data.is_empty());
        let len = u32::try_from(data.len()).expect("payload is bounded by MAX_PAYLOAD");
        let mut wire = encoded(|o| encode_offset_data_header(o, 0, offset, len, false));
        wire.extend_from_slice(data);
        assert_eq!(wire[20..], *payload, "OFFSET_DATA does not round trip");
    }
}

fn check_offset_hole(payload: &[u8]) {
    if let Ok((offset, len)) = decode_offset_hole(payload) {
        assert_ne!(len, 0);
        let wire = encoded(|o| encode_offset_hole(o, 0, offset, len, false));
        assert_eq!(wire[20..], *payload, "OFFSET_HOLE does not round trip");
    }
}

fn check_block_status(payload: &[u8]) {
    if let Ok((id, extents)) = decode_block_status(payload) {
        assert!(!extents.is_empty() && extents.len() <= MAX_BLOCK_STATUS_EXTENTS);
        assert!(extents.iter().all(|e| e.len != 0));
        let wire = encoded(|o| encode_block_status(o, 0, id, &extents, false));
        assert_eq!(wire[20..], *payload, "BLOCK_STATUS does not round trip");
    }
}

fn check_error_chunk(ty: u16, payload: &[u8]) {
    let Ok(e) = decode_error_chunk(ty, payload) else {
        return;
    };
    assert!(
        ty & REPLY_TYPE_FLAG_ERROR != 0,
        "non-error type {ty:#x} decoded"
    );
    assert_ne!(e.error, 0);
    assert_eq!(e.offset.is_some(), ty == REPLY_TYPE_ERROR_OFFSET);
    assert!(e.message.len() <= MAX_STRING_BYTES && !e.message.contains('\0'));
    // The common prefix is always error, message length, message.
    let msg_len = u16::try_from(e.message.len()).expect("message is at most 4096 bytes");
    assert_eq!(payload[..4], e.error.to_be_bytes());
    assert_eq!(payload[4..6], msg_len.to_be_bytes());
    assert_eq!(payload[6..6 + e.message.len()], *e.message.as_bytes());
    if e.message.len() > MAX_ERROR_MESSAGE_BYTES {
        return; // longer than the encoder ever sends
    }
    let wire = match (ty, e.offset) {
        (REPLY_TYPE_ERROR, None) => {
            encoded(|o| encode_error_chunk(o, 0, e.error, &e.message, false))
        }
        (REPLY_TYPE_ERROR_OFFSET, Some(offset)) => {
            encoded(|o| encode_error_offset_chunk(o, 0, e.error, &e.message, offset, false))
        }
        _ => return, // unknown error type: structured fields after the message are skipped
    };
    assert_eq!(wire[20..], *payload, "error chunk does not round trip");
}

// ---------------------------------------------------------------- every decoder

fn every_decoder(buf: &[u8]) {
    check_info(buf);
    check_rep_server(buf);
    check_rep_meta_context(buf);
    check_offset_data(buf);
    check_offset_hole(buf);
    check_block_status(buf);
    for ty in [
        REPLY_TYPE_ERROR,
        REPLY_TYPE_ERROR_OFFSET,
        REPLY_TYPE_FLAG_ERROR | 3,
    ] {
        check_error_chunk(ty, buf);
    }
    for ty in [
        REPLY_TYPE_NONE,
        REPLY_TYPE_OFFSET_DATA,
        REPLY_TYPE_BLOCK_STATUS,
    ] {
        assert_eq!(
            decode_error_chunk(ty, buf),
            Err(DecodeError::Invalid("not an error chunk type"))
        );
    }
    match decode_greeting(buf) {
        Ok(flags) => {
            let wire = encoded(|o| encode_greeting(o, flags));
            assert_eq!(wire, buf[..GREETING_BYTES], "greeting does not round trip");
        }
        Err(DecodeError::Truncated { have, .. }) => assert_eq!(have, buf.len()),
        Err(DecodeError::BadMagic { expected, .. }) => {
            assert!(expected == INIT_PASSWD || expected == IHAVEOPT);
        }
        Err(e) => panic!("greeting gave {e:?}"),
    }
    match decode_export_name_reply(buf) {
        Ok((size, flags)) => {
            let wire = encoded(|o| encode_export_name_reply(o, size, flags, true));
            assert_eq!(wire, buf[..EXPORT_NAME_REPLY_BYTES]);
            let padded = encoded(|o| encode_export_name_reply(o, size, flags, false));
            assert_eq!(
                padded.len(),
                EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZERO_PAD_BYTES
            );
        }
        Err(e) => {
            assert!(
                buf.len() < EXPORT_NAME_REPLY_BYTES,
                "{e:?} on a full EXPORT_NAME reply"
            );
        }
    }
}

/// A fixed-layout header decoder may only fail by running out of bytes (fewer than `size`)
/// or by a magic (the first `magic_len` bytes) that is not `magic`.
fn check_fixed_error(e: &DecodeError, buf: &[u8], magic: u64, magic_len: usize, size: usize) {
    match *e {
        DecodeError::Truncated { need, have } => {
            assert!(buf.len() < size && have == buf.len() && need > have && need <= size);
        }
        DecodeError::BadMagic { expected, found } => {
            assert_eq!(expected, magic);
            let mut raw = [0u8; 8];
            raw[8 - magic_len..].copy_from_slice(&buf[..magic_len]);
            assert_eq!(u64::from_be_bytes(raw), found);
            assert_ne!(found, magic);
        }
        ref other => panic!("fixed header gave {other:?}"),
    }
}
