//! Recovery of one segment (`segment::load`) from fuzzer-chosen `.dat` and `.idx` files on
//! a `MemFs`, then replay of the recovered records into a store map (`MapState::apply`).
//!
//! Input: a `store_fuzz::SegmentSpec` whose `.idx` bytes take the rest of the input:
//! `ctl: u8, [first_seq: u64], dat_len: u16, dat, idx`. The control bits put a valid
//! `.idx` header in front (bit 0), fix entry checksums (bit 1), payload checksums (bit 2)
//! and batch checksums (bit 3), or use the `.dat` bytes raw instead of behind a valid
//! 4 KiB header block (bit 4); see `fuzz/src/lib.rs`.
//!
//! Properties: `load` returns a segment or a Corrupt/Io error, never panics; its records
//! have consecutive sequence numbers (from the `.idx` header's first one unless sealed);
//! every record is one of the entries in the `.idx`; a record accepted from the provisional
//! tail has its payload inside the `.dat` with a matching checksum; a sealed
//! segment drops nothing; reading a record's payload through the segment returns exactly
//! the checksummed bytes or an error, never other data; replaying the records gives a map
//! of sorted, disjoint extents whose every boundary agrees with "the last record covering a
//! byte wins", with consistent data accounting; sealing the recovered segment and loading
//! it again gives the same records; heap growth is bounded by a multiple of the input.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use blockd::store::ErrorKind;
use blockd::store::format::{
    DAT_HEADER_BYTES, ENTRY_BYTES, Entry, IdxHeader, Record, decode_entry, payload_crc,
};
use blockd::store::io::Fs;
use blockd::store::io::mem::MemFs;
use blockd::store::map::Target;
use blockd::store::segment::{self, LoadedSegment, Segment, SegmentId};
use blockd::store::volume::MapState;
use libfuzzer_sys::fuzz_target;
use store_fuzz::{Budget, Counting, Cursor, SegmentSpec};

#[global_allocator]
static ALLOC: Counting = Counting;

const ID: SegmentId = 0x1d;
/// Payload reads checked per input (each may allocate up to 128 KiB).
const MAX_READS: usize = 8;
/// Map points checked against the model per input.
const MAX_POINTS: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let budget = Budget::start();
    let spec = SegmentSpec::parse(&mut Cursor::new(data), true);
    let fs = MemFs::new();
    let dir = Path::new("/segments");
    fs.create_dir_all(dir).expect("mkdir on MemFs");
    let (dat, idx) = spec.write(&fs, dir, ID);

    let loaded = match segment::load(&fs, dir, ID) {
        Ok(l) => l,
        Err(e) => {
            assert!(
                matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Io),
                "load failed with {e:?}"
            );
            return budget.check(limit(data.len()), "segment_replay (load error)");
        }
    };
    let found = Found::scan(&idx);
    check_loaded(&loaded, &dat, &idx, &found);
    check_reads(&loaded, &dat);
    replay(&loaded);

    if !loaded.sealed {
        segment::seal_recovered(&fs, dir, &loaded).expect("sealing on MemFs");
        let again = segment::load(&fs, dir, ID).expect("a sealed recovered segment loads");
        assert!(again.sealed, "not sealed after seal_recovered");
        assert_eq!(again.records, loaded.records, "sealing changed the records");
        assert_eq!(again.dropped_tail, 0);
    }
    budget.check(limit(data.len()), "segment_replay");
});

/// Heap budget: the files (a few copies each in MemFs and `load`), per-slot bookkeeping,
/// and a few payload buffers of at most 128 KiB (a record's length is capped by the
/// format, so that is not an input-controlled amount).
fn limit(input: usize) -> usize {
    48 * (input + DAT_HEADER_BYTES as usize) + (2 << 20)
}

/// The entries of the `.idx` (after its header slot), by sequence number.
struct Found {
    provisional: BTreeMap<u64, Vec<Record>>,
    copies: BTreeMap<u64, Vec<Record>>,
    slots: usize,
}

impl Found {
    fn scan(idx: &[u8]) -> Found {
        let mut f = Found {
            provisional: BTreeMap::new(),
            copies: BTreeMap::new(),
            slots: 0,
        };
        for slot in idx[ENTRY_BYTES..].chunks_exact(ENTRY_BYTES) {
            f.slots += 1;
            if let Ok(Entry::Record { record, in_batch }) = decode_entry(slot) {
                let m = if in_batch {
                    &mut f.copies
                } else {
                    &mut f.provisional
                };
                m.entry(record.seq()).or_default().push(record);
            }
        }
        f
    }

    fn has(m: &BTreeMap<u64, Vec<Record>>, r: &Record) -> bool {
        m.get(&r.seq()).is_some_and(|v| v.contains(r))
    }
}

/// The payload bytes of a write record, if they lie inside the `.dat`.
fn payload(dat: &[u8], data_off: u64, len: u32) -> Option<&[u8]> {
    let off = usize::try_from(data_off).ok()?;
    dat.get(off..off.checked_add(len as usize)?)
}

fn check_loaded(l: &LoadedSegment, dat: &[u8], idx: &[u8], found: &Found) {
    assert_eq!(l.seg.id, ID);
    assert!(l.seg.is_sealed(), "a loaded segment has its payload table");
    let rs = &l.records;
    assert!(rs.len() <= found.slots, "more records than slots");
    for w in rs.windows(2) {
        assert_eq!(
            w[0].seq().checked_add(1),
            Some(w[1].seq()),
            "records out of sequence: {w:?}"
        );
    }
    if l.sealed {
        assert_eq!(l.dropped_tail, 0, "a sealed segment has no torn tail");
    } else if let Some(first) = rs.first() {
        let h = IdxHeader::decode(idx).expect("load accepted the .idx header");
        assert_eq!(
            first.seq(),
            h.first_seq,
            "replay does not start at first_seq"
        );
    }
    let provisional: usize = found.provisional.values().map(Vec::len).sum();
    assert!(l.dropped_tail <= provisional);
    for r in rs {
        let committed = Found::has(&found.copies, r);
        assert!(
            committed || Found::has(&found.provisional, r),
            "{r:?} is not an entry of the .idx"
        );
        if l.sealed {
            assert!(committed, "sealed segment record {r:?} has no batch copy");
        }
        if let Record::Write {
            data_off,
            len,
            data_crc,
            ..
        } = *r
        {
            assert!(data_off >= DAT_HEADER_BYTES);
            // After every batch copy in the file, so accepted from the provisional tail:
            // its payload was checked. (Provisional records filling the gap of a damaged
            // batch below a later valid one are committed and checked only when read.)
            if found
                .copies
                .last_key_value()
                .is_none_or(|(&s, _)| r.seq() > s)
            {
                let p = payload(dat, data_off, len).unwrap_or_else(|| {
                    panic!(
                        "provisional {r:?} lies outside the .dat ({} bytes)",
                        dat.len()
                    )
                });
                assert_eq!(payload_crc(p), data_crc, "provisional {r:?}: bad payload");
            }
        }
    }
    let mut writes: Vec<(u64, u64)> = rs
        .iter()
        .filter_map(|r| match *r {
            Record::Write { data_off, len, .. } => Some((data_off, u64::from(len))),
            Record::Zero { .. } => None,
        })
        .collect();
    writes.sort_unstable();
    let mut ranges = l.seg.payload_ranges();
    ranges.sort_unstable();
    assert_eq!(
        ranges, writes,
        "payload table does not match the write records"
    );
    assert_eq!(
        l.seg.payload_bytes(),
        writes.iter().map(|&(_, n)| n).sum::<u64>()
    );
}

/// Reads through the segment return the checksummed payload or an error, never other data.
fn check_reads(l: &LoadedSegment, dat: &[u8]) {
    let writes = l.records.iter().filter_map(|r| match *r {
        Record::Write {
            data_off,
            len,
            data_crc,
            ..
        } => Some((data_off, len, data_crc)),
        Record::Zero { .. } => None,
    });
    for (data_off, len, data_crc) in writes.take(MAX_READS) {
        let mut buf = vec![0u8; len as usize];
        let intact = payload(dat, data_off, len).is_some_and(|p| payload_crc(p) == data_crc);
        match l.seg.read(&mut buf, data_off) {
            Ok(()) => {
                assert!(intact, "read of a damaged payload at {data_off} succeeded");
                assert_eq!(Some(&buf[..]), payload(dat, data_off, len));
            }
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Io),
                "read failed with {e:?}"
            ),
        }
    }
}

/// What a byte reads as after the records, by brute force: the last record covering it.
#[derive(Debug, PartialEq, Eq)]
enum Model {
    Hole,
    Zero,
    /// Offset in the segment.
    Data(u64),
}

fn model_at(records: &[Record], x: u64) -> Model {
    for r in records.iter().rev() {
        let (logical, len) = r.logical();
        if x < logical || x - logical >= len {
            continue;
        }
        return match *r {
            Record::Write { data_off, .. } => Model::Data(data_off + (x - logical)),
            Record::Zero {
                keep_allocated: true,
                ..
            } => Model::Zero,
            Record::Zero {
                keep_allocated: false,
                ..
            } => Model::Hole,
        };
    }
    Model::Hole
}

fn map_at(st: &MapState, seg: &Arc<Segment>, x: u64) -> Model {
    let mut got = None;
    st.map.visit(x, 1, |o, l, t| {
        assert!(o == x && l == 1, "visit of one byte gave ({o}, {l})");
        assert!(got.is_none(), "visit of one byte gave two pieces");
        got = Some(match t {
            None => Model::Hole,
            Some(Target::Zero) => Model::Zero,
            Some(Target::Data(loc)) => {
                assert!(Arc::ptr_eq(&loc.seg, seg), "data in another segment");
                Model::Data(loc.off)
            }
        });
    });
    got.expect("visit of one byte gave nothing")
}

fn replay(l: &LoadedSegment) {
    let mut st = MapState::default();
    st.own_live.insert(ID, 0);
    for r in &l.records {
        st.apply(r, &l.seg);
    }
    // Sorted, disjoint, non-empty extents; accounting matches the map.
    let mut prev_end = None::<u64>;
    let mut data = 0u64;
    let mut points = Vec::new();
    for (k, len, t) in st.map.iter() {
        assert!(len > 0, "empty extent at {k}");
        let end = k.checked_add(len).expect("extent end overflows");
        assert!(prev_end.is_none_or(|p| p <= k), "extents overlap at {k}");
        prev_end = Some(end);
        if let Target::Data(loc) = t {
            data += len;
            assert!(loc.off.checked_add(len).is_some());
        }
        points.extend([k, end - 1]);
    }
    assert_eq!(st.data_bytes, data, "data_bytes disagrees with the map");
    assert_eq!(st.map.data_bytes(), data);
    assert_eq!(
        st.own_live.get(&ID).copied(),
        Some(data),
        "own_live accounting"
    );
    assert_eq!(st.unique_bytes(), data);
    let mut live: Vec<(u64, u64)> = st.live_ranges(ID);
    live.sort_unstable();
    assert_eq!(live.iter().map(|&(_, n)| n).sum::<u64>(), data);

    // Every extent boundary and every record boundary reads as the model says.
    for r in &l.records {
        let (logical, len) = r.logical();
        points.extend([logical, logical + len - 1]);
        points.extend(logical.checked_sub(1));
        points.extend(logical.checked_add(len));
    }
    points.sort_unstable();
    points.dedup();
    for &x in points.iter().take(MAX_POINTS) {
        assert_eq!(
            map_at(&st, &l.seg, x),
            model_at(&l.records, x),
            "map and records disagree at logical offset {x}"
        );
    }
}
