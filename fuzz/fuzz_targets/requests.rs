//! Server side of the transmission phase: a stream of requests as the server reads it.
//!
//! The input is the byte stream after the handshake: 28-byte request headers, each WRITE
//! followed by its payload. Decoding stops at the first error, as the server disconnects.
//!
//! Properties: no panic; every accepted header re-encodes to exactly its 28 bytes and
//! decodes again to the same value; the command number survives `from_wire`/`to_wire`;
//! only WRITE carries a payload; errors are exactly "too short" or "wrong magic".
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::DecodeError;
use nbd_proto::consts::*;
use nbd_proto::transmission::*;

/// Requests per input: bounds the work of one run.
const MAX_REQUESTS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    for _ in 0..MAX_REQUESTS {
        let req = match decode_request(rest) {
            Ok(req) => req,
            Err(DecodeError::Truncated { need, have }) => {
                assert!(rest.len() < REQUEST_BYTES, "full header reported truncated");
                assert!(have == rest.len() && need > have && need <= REQUEST_BYTES);
                return;
            }
            Err(DecodeError::BadMagic { expected, found }) => {
                assert_eq!(expected, u64::from(REQUEST_MAGIC));
                assert_eq!(u64::from(u32::from_be_bytes(head4(rest))), found);
                assert_ne!(found, u64::from(REQUEST_MAGIC));
                return;
            }
            Err(e) => panic!("request header gave {e:?}"),
        };
        check(&req, &rest[..REQUEST_BYTES]);
        rest = &rest[REQUEST_BYTES..];
        let payload = usize::try_from(req.payload_len()).expect("u32 fits in usize");
        rest = &rest[payload.min(rest.len())..];
    }
});

fn head4(buf: &[u8]) -> [u8; 4] {
    buf[..4]
        .try_into()
        .expect("a magic was read, so 4 bytes are there")
}

fn check(req: &Request, header: &[u8]) {
    let mut wire = Vec::new();
    encode_request(&mut wire, req);
    assert_eq!(wire, header, "request header does not round trip");
    assert_eq!(decode_request(&wire), Ok(*req));

    let wire_type = u16::from_be_bytes([header[6], header[7]]);
    assert_eq!(req.command.to_wire(), wire_type);
    assert_eq!(Command::from_wire(wire_type), req.command);
    assert_eq!(
        matches!(req.command, Command::Unknown(_)),
        wire_type > CMD_BLOCK_STATUS
    );

    let expected_payload = if req.command == Command::Write {
        req.len
    } else {
        0
    };
    assert_eq!(req.payload_len(), expected_payload);
    assert_eq!(req.command.allowed_flags() & !CMD_FLAGS_KNOWN, 0);
    assert!(req.command.allowed_flags() & CMD_FLAG_FUA != 0);
    for bit in 0..16 {
        let flag = 1u16 << bit;
        assert_eq!(req.has(flag), req.flags & flag != 0);
    }
}
