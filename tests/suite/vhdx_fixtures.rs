//! The VHDX format layer against the 12 real files of `../shared/fixtures/real-vhdx`
//! (PROVENANCE.md there states every fact asserted here): identifier, headers, region tables,
//! metadata, the BAT before and after an in-memory replay of the log, parent locators.
//! The MIT and Apache files are in `fixtures/vhdx/`; qemu's GPL ones are read from
//! `../shared` and skipped with a note when it is absent.

use crate::common;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use common::fixtures::vhdx_fixture;
use uuid::{Uuid, uuid};
use vhd_merge::io::FileStorage;
use vhd_merge::vhdx::VhdxReader;
use vhd_merge::vhdx::format::bat::{BatEntry, BitmapState, Geometry, PayloadState, bitmap_bit};
use vhd_merge::vhdx::format::header::{FileIdentifier, current_header};
use vhd_merge::vhdx::format::log::{ReplayPlan, find_active};
use vhd_merge::vhdx::format::metadata::{KNOWN_LOCATOR_KEYS, Metadata};
use vhd_merge::vhdx::format::region::choose_region_table;
use vhd_merge::vhdx::format::{
    HEADER1_OFFSET, HEADER2_OFFSET, MIB, REGION_TABLE1_OFFSET, REGION_TABLE2_OFFSET, SLOT_SIZE,
};

use PayloadState::*;

/// What PROVENANCE.md says about one file.
struct Fact {
    rel: &'static str,
    creator: &'static str,
    virtual_size: u64,
    block_size: u32,
    sectors: (u32, u32),
    fixed: bool,
    has_parent: bool,
    /// Payload state counts before replay (states not listed: none, except NotPresent = rest).
    before: &'static [(PayloadState, u64)],
    /// Entries of the active log sequence (0: clean).
    active_entries: usize,
    /// Payload state counts after replaying the log in memory.
    after: &'static [(PayloadState, u64)],
}

const GIB: u64 = 1 << 30;
const WIN10: &str = "Microsoft Windows 10.0.19041.0";

const FACTS: &[Fact] = &[
    Fact {
        rel: "qemu-iotests/iotest-dirtylog-10G-4M.vhdx",
        creator: "QEMU v1.6.50",
        virtual_size: 10 * GIB,
        block_size: 1 << 20,
        sectors: (512, 512),
        fixed: false,
        has_parent: false,
        before: &[(FullyPresent, 17)],
        active_entries: 1,
        after: &[(FullyPresent, 18)],
    },
    Fact {
        rel: "qemu-iotests/iotest-dynamic-1G.vhdx",
        creator: "Microsoft Windows 6.2.9200.16384",
        virtual_size: GIB,
        block_size: 32 << 20,
        sectors: (512, 4096),
        fixed: false,
        has_parent: false,
        before: &[(FullyPresent, 3), (Zero, 29)],
        active_entries: 0,
        after: &[(FullyPresent, 3), (Zero, 29)],
    },
    Fact {
        rel: "dfvfs/ext2.vhdx",
        creator: "QEMU v5.2.0",
        virtual_size: 4 << 20,
        block_size: 8 << 20,
        sectors: (512, 512),
        fixed: false,
        has_parent: false,
        before: &[(FullyPresent, 1)],
        active_entries: 0,
        after: &[(FullyPresent, 1)],
    },
    Fact {
        rel: "dfvfs/ntfs-fixed.vhdx",
        creator: WIN10,
        virtual_size: 4 << 20,
        block_size: 2 << 20,
        sectors: (512, 4096),
        fixed: true,
        has_parent: false,
        before: &[(FullyPresent, 2)],
        active_entries: 0,
        after: &[(FullyPresent, 2)],
    },
    Fact {
        rel: "dfvfs/ntfs-parent.vhdx",
        creator: WIN10,
        virtual_size: 4 << 20,
        block_size: 2 << 20,
        sectors: (512, 4096),
        fixed: true,
        has_parent: false,
        before: &[(FullyPresent, 2)],
        active_entries: 0,
        after: &[(FullyPresent, 2)],
    },
    Fact {
        rel: "dfvfs/ntfs-differential.vhdx",
        creator: WIN10,
        virtual_size: 4 << 20,
        block_size: 2 << 20,
        sectors: (512, 4096),
        fixed: false,
        has_parent: true,
        before: &[(PartiallyPresent, 2)],
        active_entries: 0,
        after: &[(PartiallyPresent, 2)],
    },
    Fact {
        rel: "dfvfs/fat-parent.vhdx",
        creator: WIN10,
        virtual_size: 4 << 20,
        block_size: 2 << 20,
        sectors: (512, 4096),
        fixed: true,
        has_parent: false,
        before: &[(FullyPresent, 2)],
        active_entries: 0,
        after: &[(FullyPresent, 2)],
    },
    Fact {
        rel: "dfvfs/fat-differential.vhdx",
        creator: WIN10,
        virtual_size: 4 << 20,
        block_size: 2 << 20,
        sectors: (512, 4096),
        fixed: false,
        has_parent: true,
        before: &[(PartiallyPresent, 1)],
        active_entries: 0,
        after: &[(PartiallyPresent, 1)],
    },
    Fact {
        rel: "discutils/vhdx-log-replay.vhdx",
        creator: "Microsoft Windows 10.0.15063.0",
        virtual_size: GIB,
        block_size: 32 << 20,
        sectors: (512, 4096),
        fixed: false,
        has_parent: false,
        before: &[],
        active_entries: 2,
        after: &[(FullyPresent, 1), (Zero, 3)],
    },
    Fact {
        rel: "discutils/btrfs.vhdx",
        creator: "Microsoft Windows 10.0.15063.0",
        virtual_size: GIB,
        block_size: 32 << 20,
        sectors: (512, 4096),
        fixed: false,
        has_parent: false,
        before: &[(FullyPresent, 2), (Zero, 1)],
        active_entries: 0,
        after: &[(FullyPresent, 2), (Zero, 1)],
    },
    Fact {
        rel: "discutils/lvm2.vhdx",
        creator: "Microsoft Windows 10.0.14393.0",
        virtual_size: 10 * GIB,
        block_size: 32 << 20,
        sectors: (512, 4096),
        fixed: false,
        has_parent: false,
        before: &[(FullyPresent, 18), (Zero, 39), (Unmapped, 25)],
        active_entries: 0,
        after: &[(FullyPresent, 18), (Zero, 39), (Unmapped, 25)],
    },
    Fact {
        rel: "discutils/xfs.vhdx",
        creator: "Microsoft Windows 10.0.14393.0",
        virtual_size: 10 * GIB,
        block_size: 32 << 20,
        sectors: (512, 4096),
        fixed: false,
        has_parent: false,
        before: &[(FullyPresent, 20), (Zero, 58)],
        active_entries: 0,
        after: &[(FullyPresent, 20), (Zero, 58)],
    },
];

/// `len` bytes of `path` at `offset`, with plain std::fs.
fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut f = File::open(path).expect("open fixture");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0; len as usize];
    f.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("read {len} bytes at {offset}: {e}"));
    buf
}

/// Everything the format layer gives for one file, with the log replayed in memory.
struct Parsed {
    creator: String,
    data_write_guid: Uuid,
    metadata: Metadata,
    geometry: Geometry,
    plan: Option<ReplayPlan>,
    bat_before: Vec<u8>,
    bat_after: Vec<u8>,
    bat_offset: u64,
}

/// Read `len` bytes at `offset` and apply the replay plan to them.
fn replayed(path: &Path, plan: &Option<ReplayPlan>, offset: u64, len: u64) -> Vec<u8> {
    let mut b = read_range(path, offset, len);
    if let Some(p) = plan {
        p.apply_to(&mut b, offset);
    }
    b
}

fn parse(path: &Path) -> Parsed {
    let file_len = std::fs::metadata(path).expect("stat").len();
    let start = read_range(path, 0, MIB);
    let creator = FileIdentifier::parse(&start).expect("identifier").creator;
    let slot = |off: u64| &start[off as usize..off as usize + SLOT_SIZE];
    let header = current_header(slot(HEADER1_OFFSET), slot(HEADER2_OFFSET))
        .expect("header")
        .header;
    let log = read_range(path, header.log_offset, header.log_length.into());
    let plan = find_active(&log, header.log_guid).expect("log");
    if let Some(p) = &plan {
        p.check(file_len).expect("replay plan fits the file");
    }
    // [MS-VHDX] 2.3.3: replay before interpreting anything but the headers and the log.
    let start = replayed(path, &plan, 0, MIB);
    let at = |off: u64| &start[off as usize..off as usize + SLOT_SIZE];
    let (table, _) = choose_region_table(at(REGION_TABLE1_OFFSET), at(REGION_TABLE2_OFFSET))
        .expect("region table");
    let log_range = header.log_range();
    let regions = table.known(log_range).expect("known regions");
    let md = replayed(
        path,
        &plan,
        regions.metadata.file_offset,
        regions.metadata.length.into(),
    );
    let metadata = Metadata::parse(&md).expect("metadata");
    let fp = metadata.file_parameters;
    let geometry = Geometry::new(
        metadata.virtual_disk_size,
        fp.block_size,
        metadata.logical_sector_size,
        fp.has_parent,
    )
    .expect("geometry");
    geometry
        .check_bat_region(regions.bat.length.into())
        .expect("BAT region size");
    let bat_before = read_range(path, regions.bat.file_offset, regions.bat.length.into());
    let bat_after = replayed(
        path,
        &plan,
        regions.bat.file_offset,
        regions.bat.length.into(),
    );
    Parsed {
        creator,
        data_write_guid: header.data_write_guid,
        metadata,
        geometry,
        plan,
        bat_before,
        bat_after,
        bat_offset: regions.bat.file_offset,
    }
}

/// Payload state counts of a BAT (every data block's entry).
fn state_counts(g: &Geometry, bat: &[u8]) -> HashMap<PayloadState, u64> {
    let mut counts = HashMap::new();
    for i in 0..g.data_blocks() {
        let e = BatEntry::at(bat, g.payload_index(i)).expect("entry inside the BAT");
        *counts
            .entry(e.payload_state().expect("payload state"))
            .or_insert(0) += 1;
    }
    counts
}

/// The expected counts: the listed ones, NotPresent for the rest.
fn expected(g: &Geometry, listed: &[(PayloadState, u64)]) -> HashMap<PayloadState, u64> {
    let mut m: HashMap<_, _> = listed.iter().copied().collect();
    let rest = g.data_blocks() - listed.iter().map(|(_, n)| n).sum::<u64>();
    if rest > 0 {
        m.insert(NotPresent, rest);
    }
    m
}

#[test]
fn every_vhdx_fixture_has_its_stated_structure() {
    let mut seen = 0;
    for f in FACTS {
        let Some((path, _)) = vhdx_fixture(f.rel) else {
            continue;
        };
        let p = parse(&path);
        let m = &p.metadata;
        assert!(
            p.creator.starts_with(f.creator),
            "{}: creator {:?}",
            f.rel,
            p.creator
        );
        assert_eq!(m.virtual_disk_size, f.virtual_size, "{}", f.rel);
        assert_eq!(m.file_parameters.block_size, f.block_size, "{}", f.rel);
        assert_eq!(
            (m.logical_sector_size, m.physical_sector_size),
            f.sectors,
            "{}",
            f.rel
        );
        assert_eq!(
            m.file_parameters.leave_block_allocated, f.fixed,
            "{}",
            f.rel
        );
        assert_eq!(m.file_parameters.has_parent, f.has_parent, "{}", f.rel);
        assert_eq!(
            p.plan.as_ref().map_or(0, |p| p.entries.len()),
            f.active_entries,
            "{}: active entries",
            f.rel
        );
        assert_eq!(
            state_counts(&p.geometry, &p.bat_before),
            expected(&p.geometry, f.before),
            "{}: before replay",
            f.rel
        );
        assert_eq!(
            state_counts(&p.geometry, &p.bat_after),
            expected(&p.geometry, f.after),
            "{}: after replay",
            f.rel
        );
        seen += 1;
    }
    assert!(
        seen >= 10,
        "the 10 MIT/Apache files are in the repository; saw {seen}"
    );
}

#[test]
fn dirty_logs_replay_the_stated_entries() {
    if let Some((path, _)) = vhdx_fixture("qemu-iotests/iotest-dirtylog-10G-4M.vhdx") {
        let p = parse(&path);
        let plan = p.plan.expect("dirty");
        let head = plan.head().expect("head");
        assert_eq!(head.header.sequence_number, 7);
        assert_eq!(head.writes.len(), 1);
        assert_eq!(
            head.writes[0].range().start,
            0x200000,
            "one data descriptor into the BAT page"
        );
        assert_eq!(p.bat_offset, 0x200000);
    }
    let (path, _) = vhdx_fixture("discutils/vhdx-log-replay.vhdx").expect("in the repository");
    let plan = parse(&path).plan.expect("dirty");
    assert_eq!(
        plan.entries.len(),
        2,
        "the spec sequence, not the 5-entry run"
    );
    assert_eq!(
        plan.entries[0].log_offset, 0x5000,
        "replayed from the head's Tail"
    );
    let seqs: Vec<u64> = plan
        .entries
        .iter()
        .map(|e| e.header.sequence_number)
        .collect();
    assert_eq!(seqs[1], seqs[0] + 1);
}

#[test]
fn differencing_fixtures_link_to_their_parents() {
    for (child, parent, guid, from_child) in [
        (
            "dfvfs/ntfs-differential.vhdx",
            "dfvfs/ntfs-parent.vhdx",
            uuid!("7584f8fb-36d3-4091-afb5-b1afe587bfa8"),
            Some(200),
        ),
        (
            "dfvfs/fat-differential.vhdx",
            "dfvfs/fat-parent.vhdx",
            uuid!("f88d4d92-6fcc-408d-9bef-9b7c89f15c89"),
            None,
        ),
    ] {
        let c = parse(&vhdx_fixture(child).expect("in the repository").0);
        let par = parse(&vhdx_fixture(parent).expect("in the repository").0);
        assert_eq!(par.data_write_guid, guid, "{parent}");
        let pl = c.metadata.parent_locator.as_ref().expect("parent locator");
        assert_eq!(pl.parent_linkage().expect("linkage"), guid, "{child}");
        assert_eq!(pl.parent_linkage2(), Some(Uuid::nil()), "{child}");
        let mut keys: Vec<&str> = pl.entries.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort();
        let mut known = KNOWN_LOCATOR_KEYS.to_vec();
        known.sort();
        assert_eq!(keys, known, "{child}: the five keys Hyper-V writes");
        let name = Path::new(parent)
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name");
        assert_eq!(
            pl.get("relative_path"),
            Some(format!(".\\{name}").as_str()),
            "{child}"
        );
        if let Some(n) = from_child {
            assert_eq!(
                sectors_in_child(&c, &vhdx_fixture(child).expect("fixture").0),
                n,
                "{child}"
            );
        }
    }
}

/// Sectors the child holds: the bitmap bits of its PARTIALLY_PRESENT blocks.
fn sectors_in_child(c: &Parsed, path: &Path) -> usize {
    let g = &c.geometry;
    let sb = BatEntry::at(&c.bat_after, g.bitmap_index(0)).expect("SB entry");
    assert_eq!(sb.bitmap_state().expect("SB state"), BitmapState::Present);
    assert_eq!(sb.file_offset(), 4 * MIB, "SB block at 4 MiB");
    let bitmap = read_range(path, sb.file_offset(), MIB);
    let per_block = (g.block_size / g.logical_sector_size) as usize;
    (0..g.data_blocks())
        .filter(|&i| {
            BatEntry::at(&c.bat_after, g.payload_index(i)).and_then(|e| e.payload_state().ok())
                == Some(PartiallyPresent)
        })
        .map(|i| {
            let slice = &bitmap[g.bitmap_slice(i)];
            (0..per_block).filter(|&n| bitmap_bit(slice, n)).count()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// The read-only reader: every non-differencing file reads with the virtual SHA-256 of
// PROVENANCE.md (pyvhdi's, = qemu-img convert's; for the dirty logs, after replay).

const VIRTUAL_SHA256: &[(&str, &str)] = &[
    (
        "qemu-iotests/iotest-dirtylog-10G-4M.vhdx",
        "179cefe8b0587f123393eedf2aa7aa8d25798591178e6bc3950a09762f38f96f",
    ),
    (
        "qemu-iotests/iotest-dynamic-1G.vhdx",
        "d3d112d8dab7fd360609f7d5a7b769904b7a2a7d7b6b8c535f65a23293c05478",
    ),
    (
        "dfvfs/ext2.vhdx",
        "a6c2f0e39afe6c6ab432ca5465349fcefe8dc944398e97b2d957d3f89dbb5d80",
    ),
    (
        "dfvfs/ntfs-fixed.vhdx",
        "5237dd895f38052344e2ef35a207fe9df08cd18d17b6ea857a1b93cc475e1f2e",
    ),
    (
        "dfvfs/ntfs-parent.vhdx",
        "c5523065bc6ef82267be56c5f8888e2876ead8ba7edba2a65a3da8b076231b68",
    ),
    (
        "dfvfs/fat-parent.vhdx",
        "2d1954fec68faefe81dd3687282a9b387bf8417f6d2cf0da3825fa1445b64cfb",
    ),
    (
        "discutils/vhdx-log-replay.vhdx",
        "3ba3b309425b7ff5e8e0199edceed95226250f880c53b24e8eae93865f3fad5e",
    ),
    (
        "discutils/btrfs.vhdx",
        "0b959f9cb4e18348ad8b646f152178282542c8304f02fddf765e3fd1a1de6864",
    ),
    (
        "discutils/lvm2.vhdx",
        "f7dc6812a3b12a35f3ec895ce981bd59ff4558270fc80cd812c9cd522bff1295",
    ),
    (
        "discutils/xfs.vhdx",
        "8ca2bd2d91f1c6ada47128fc2f8d38587e73954ede5a664fe2bb09c19606060e",
    ),
];

fn open_reader(path: &Path) -> vhd_merge::Result<VhdxReader<FileStorage>> {
    VhdxReader::open(FileStorage::new(File::open(path).expect("open fixture")))
}

fn virtual_sha256(r: &VhdxReader<FileStorage>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < r.virtual_size() {
        let n = (r.virtual_size() - at).min(buf.len() as u64) as usize;
        r.read_at(at, &mut buf[..n]).expect("read");
        h.update(&buf[..n]);
        at += n as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_reader_reads_every_fixed_and_dynamic_fixture_with_its_virtual_sha256() {
    let mut seen = 0;
    for (rel, sha) in VIRTUAL_SHA256 {
        let Some((path, _)) = vhdx_fixture(rel) else {
            continue;
        };
        let r = open_reader(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(virtual_sha256(&r), *sha, "{rel}");
        let dirty = rel.contains("dirtylog") || rel.contains("log-replay");
        assert_eq!(
            r.replayed_entries() > 0,
            dirty,
            "{rel}: replayed in memory only when dirty"
        );
        seen += 1;
    }
    assert!(
        seen >= 8,
        "the 8 MIT/Apache files are in the repository; saw {seen}"
    );
}

#[test]
fn the_reader_refuses_differencing_files_for_now() {
    let (path, _) = vhdx_fixture("dfvfs/ntfs-differential.vhdx").expect("in the repository");
    let err = open_reader(&path).expect_err("differencing");
    assert_eq!(
        err.return_code(),
        vhd_merge::ReturnCode::NotSupported,
        "{err}"
    );
}

#[test]
fn the_reader_never_writes_a_dirty_file() {
    let (path, _) = vhdx_fixture("discutils/vhdx-log-replay.vhdx").expect("in the repository");
    let before = std::fs::read(&path).expect("read");
    let r = open_reader(&path).expect("open");
    let mut mbr = [0u8; 512];
    r.read_at(0, &mut mbr).expect("read");
    assert_eq!(&mbr[510..], &[0x55, 0xAA], "the replayed disk has its MBR");
    assert_eq!(std::fs::read(&path).expect("read"), before);
}

/// Damaged copies of a clean and a dirty real file (one byte changed in the header section,
/// the log, the metadata region or the BAT) open with an error or read, never panic; in memory,
/// so no allocation can grow past what the bytes allow.
#[test]
fn damaged_fixtures_fail_cleanly() {
    use vhd_merge::io::MemStorage;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for rel in ["dfvfs/ntfs-fixed.vhdx", "discutils/vhdx-log-replay.vhdx"] {
        let (path, _) = vhdx_fixture(rel).expect("in the repository");
        let good = std::fs::read(&path).expect("read");
        let (mut errors, mut opened) = (0, 0);
        for _ in 0..150 {
            let mut bytes = good.clone();
            // Structures live below 4 MiB + 64 KiB in both files; aim at their first bytes.
            let area =
                [64 << 10, 128 << 10, 192 << 10, MIB, 2 * MIB, 3 * MIB][(next() % 6) as usize];
            let at = area as usize + (next() % 512) as usize;
            bytes[at] ^= 1 << (next() % 8);
            match VhdxReader::open(MemStorage::new(bytes)) {
                Ok(r) => {
                    let mut buf = vec![0; 1 << 20];
                    let _ = r.read_at(0, &mut buf);
                    opened += 1;
                }
                Err(e) => {
                    assert!(e.return_code() as u32 >= 32768, "{rel}: {e}");
                    errors += 1;
                }
            }
        }
        assert!(
            errors > 0 && opened > 0,
            "{rel}: {errors} errors, {opened} opened: both kinds expected"
        );
    }
}
