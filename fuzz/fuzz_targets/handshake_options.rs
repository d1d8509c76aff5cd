//! Server side of the handshake: client flags, then options, as a server reads them.
//!
//! Input layout: offered handshake flags (2 bytes), client flags word (4), an option code
//! (4), then bytes used twice: as the data of that option, and as a stream of framed
//! options (IHAVEOPT, code, length, data) decoded until the first error.
//!
//! Properties: no panic; whatever decodes re-encodes to exactly the bytes it came from;
//! client flags never grant a feature the server did not offer; errors name the option.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::DecodeError;
use nbd_proto::consts::*;
use nbd_proto::handshake::*;

/// Options per input: bounds the work of one run.
const MAX_OPTIONS: usize = 32;

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<10>() else {
        return;
    };
    let offered = u16::from_be_bytes([head[0], head[1]]);
    check_client_flags(&head[2..6], offered);
    let option = u32::from_be_bytes([head[6], head[7], head[8], head[9]]);
    check_option(option, rest);
    check_option_stream(rest);
});

fn check_client_flags(word: &[u8], offered: u16) {
    let bits = u32::from_be_bytes(word.try_into().expect("caller passes 4 bytes"));
    let mut allowed = 0;
    if offered & FLAG_FIXED_NEWSTYLE != 0 {
        allowed |= FLAG_C_FIXED_NEWSTYLE;
    }
    if offered & FLAG_NO_ZEROES != 0 {
        allowed |= FLAG_C_NO_ZEROES;
    }
    match decode_client_flags(word, offered) {
        Ok(flags) => {
            assert_eq!(bits & !allowed, 0, "accepted a flag that was not offered");
            let mut wire = Vec::new();
            encode_client_flags(&mut wire, flags);
            assert_eq!(wire, word, "client flags do not round trip");
        }
        Err(DecodeError::UnknownClientFlags(bad)) => {
            assert_eq!(bad, bits & !allowed, "wrong set of refused flags");
            assert_ne!(bad, 0);
        }
        Err(e) => panic!("4-byte client flags gave {e:?}"),
    }
}

fn check_option(option: u32, data: &[u8]) {
    match decode_option(option, data) {
        Ok(ClientOption::ExportName(name)) => {
            assert_eq!(option, OPT_EXPORT_NAME);
            assert_eq!(name.as_bytes(), data);
        }
        Ok(ClientOption::Abort) => assert_eq!(option, OPT_ABORT),
        Ok(ClientOption::List) => assert!(option == OPT_LIST && data.is_empty()),
        Ok(ClientOption::StartTls) => assert!(option == OPT_STARTTLS && data.is_empty()),
        Ok(ClientOption::StructuredReply) => {
            assert!(option == OPT_STRUCTURED_REPLY && data.is_empty());
        }
        Ok(ClientOption::Info(req)) => {
            assert_eq!(option, OPT_INFO);
            check_go(&req, data);
        }
        Ok(ClientOption::Go(req)) => {
            assert_eq!(option, OPT_GO);
            check_go(&req, data);
        }
        Ok(ClientOption::ListMetaContext(req)) => {
            assert_eq!(option, OPT_LIST_META_CONTEXT);
            check_meta(&req, data);
        }
        Ok(ClientOption::SetMetaContext(req)) => {
            assert_eq!(option, OPT_SET_META_CONTEXT);
            check_meta(&req, data);
        }
        Ok(ClientOption::Unsupported(code)) => {
            assert_eq!(code, option);
            let known = [
                OPT_EXPORT_NAME,
                OPT_ABORT,
                OPT_LIST,
                OPT_STARTTLS,
                OPT_INFO,
                OPT_GO,
                OPT_STRUCTURED_REPLY,
                OPT_LIST_META_CONTEXT,
                OPT_SET_META_CONTEXT,
            ];
            assert!(
                !known.contains(&code),
                "known option {code} reported unsupported"
            );
        }
        Err(e) => {
            assert_eq!(e.option, option);
            assert!(!e.message.is_empty());
            assert_ne!(option, OPT_ABORT, "ABORT must ignore its data");
        }
    }
}

fn check_go(req: &GoRequest, data: &[u8]) {
    assert!(req.info_requests.len() <= usize::from(MAX_INFO_REQUESTS));
    assert!(req.name.len() <= MAX_STRING_BYTES && !req.name.contains('\0'));
    assert_eq!(req.encode(), data, "INFO/GO data does not round trip");
}

fn check_meta(req: &MetaContextRequest, data: &[u8]) {
    assert!(req.queries.len() <= MAX_META_QUERIES as usize);
    for s in std::iter::once(&req.export).chain(&req.queries) {
        assert!(s.len() <= MAX_STRING_BYTES && !s.contains('\0'));
    }
    assert_eq!(req.encode(), data, "META_CONTEXT data does not round trip");
}

/// Frames options the way the server does: header, then `len` bytes of data, refusing to
/// buffer anything over the option size limit.
fn check_option_stream(mut rest: &[u8]) {
    for _ in 0..MAX_OPTIONS {
        let header = match decode_option_header(rest) {
            Ok(h) => h,
            Err(DecodeError::Truncated { need, have }) => {
                assert!(rest.len() < OPTION_HEADER_BYTES && have == rest.len() && need > have);
                return;
            }
            Err(DecodeError::BadMagic { expected, found }) => {
                assert_eq!(expected, IHAVEOPT);
                assert_eq!(found.to_be_bytes(), rest[..8]);
                assert_ne!(found, IHAVEOPT);
                return;
            }
            Err(e) => panic!("option header gave {e:?}"),
        };
        let mut wire = Vec::new();
        encode_option(&mut wire, header.option, &[]);
        assert_eq!(wire[..12], rest[..12], "option header does not round trip");
        assert_eq!(header.len.to_be_bytes(), rest[12..16]);
        if header.len > MAX_OPTION_DATA_BYTES {
            return;
        }
        let body = &rest[OPTION_HEADER_BYTES..];
        let Some(data) = body.get(..header.len as usize) else {
            return;
        };
        check_option(header.option, data);
        rest = &body[data.len()..];
    }
}
