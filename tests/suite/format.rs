//! The format layer and one file's reads and writes:
//!
//! - parse(serialize(x)) == x for the footer and the dynamic header over arbitrary fields;
//! - random sector writes into created dynamic and differencing images read back exactly
//!   after reopening, for block sizes from 512 bytes to 2 MiB, and a differencing disk's
//!   bitmaps hold exactly the written sectors;
//! - 511-byte footers and missing or damaged end footers open (with a warning);
//! - the CHS algorithm gives the geometry real files carry;
//! - parent locator payloads are read only when they are inside the file and small.

use crate::common;

use proptest::prelude::*;
use uuid::Uuid;
use vhd_merge::create::{self, CreateOptions};
use vhd_merge::format::{
    DiskType, DynamicHeader, Footer, Geometry, ParentLocator, PlatformCode, SectorBitmap,
};
use vhd_merge::image::FooterSource;
use vhd_merge::{BlockMap, OpenOptions, ReturnCode, Vhd};

// ---------------------------------------------------------------------------------------------
// Round trips.

fn arb_footer() -> impl Strategy<Value = Footer> {
    (
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>()),
        (any::<[u8; 4]>(), any::<u32>(), any::<u32>()),
        (any::<u64>(), any::<u64>()),
        (any::<u16>(), any::<u8>(), any::<u8>(), any::<u32>()),
        (any::<[u8; 16]>(), any::<u8>()),
        prop::collection::vec(any::<u8>(), 427),
    )
        .prop_map(
            |(
                (features, format_version, data_offset, timestamp),
                (creator_application, creator_version, creator_host_os),
                (original_size, current_size),
                (cylinders, heads, sectors_per_track, disk_type),
                (id, saved_state),
                reserved,
            )| {
                let mut f = Footer {
                    features,
                    format_version,
                    data_offset,
                    timestamp,
                    creator_application,
                    creator_version,
                    creator_host_os,
                    original_size,
                    current_size,
                    geometry: Geometry {
                        cylinders,
                        heads,
                        sectors_per_track,
                    },
                    disk_type: DiskType::from_u32(disk_type),
                    checksum: 0,
                    unique_id: Uuid::from_bytes(id),
                    saved_state,
                    reserved: reserved.try_into().unwrap(),
                };
                f.fix_checksum();
                f
            },
        )
}

fn arb_locator() -> impl Strategy<Value = ParentLocator> {
    (
        prop_oneof![
            Just(0u32),
            Just(0x5769_3272),
            Just(0x5769_326B),
            Just(0x5732_7275),
            Just(0x5732_6B75),
            Just(0x4D61_6320),
            Just(0x4D61_6358),
            any::<u32>(),
        ],
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(code, data_space, data_length, reserved, data_offset)| ParentLocator {
                platform_code: PlatformCode::from_u32(code),
                data_space,
                data_length,
                reserved,
                data_offset,
            },
        )
}

fn arb_header() -> impl Strategy<Value = DynamicHeader> {
    (
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()),
        (any::<u32>(), any::<[u8; 16]>(), any::<u32>(), any::<u32>()),
        prop::collection::vec(any::<u8>(), 512),
        prop::array::uniform8(arb_locator()),
        prop::collection::vec(any::<u8>(), 256),
    )
        .prop_map(
            |(
                (data_offset, table_offset, header_version, max_table_entries),
                (block_size, parent, parent_timestamp, reserved1),
                name,
                locators,
                reserved2,
            )| {
                let mut h = DynamicHeader {
                    data_offset,
                    table_offset,
                    header_version,
                    max_table_entries,
                    block_size,
                    checksum: 0,
                    parent_unique_id: Uuid::from_bytes(parent),
                    parent_timestamp,
                    reserved1,
                    parent_name_raw: name.try_into().unwrap(),
                    locators,
                    reserved2: reserved2.try_into().unwrap(),
                };
                h.fix_checksum();
                h
            },
        )
}

proptest! {
    #[test]
    fn footer_round_trips(f in arb_footer()) {
        let bytes = f.to_bytes();
        let back = Footer::parse(&bytes).unwrap();
        prop_assert!(back.checksum_ok());
        prop_assert_eq!(back, f);
    }

    #[test]
    fn header_round_trips(h in arb_header()) {
        let bytes = h.to_bytes();
        let back = DynamicHeader::parse(&bytes).unwrap();
        prop_assert!(back.checksum_ok());
        prop_assert_eq!(back, h);
    }

    /// Any 512 bytes with the cookie parse, and serialise back to the same bytes except the
    /// checksum field, which is recomputed; `checksum_ok` tells whether it was right.
    #[test]
    fn footer_bytes_round_trip(tail in prop::collection::vec(any::<u8>(), 504)) {
        let mut b = [0u8; 512];
        b[..8].copy_from_slice(b"conectix");
        b[8..].copy_from_slice(&tail);
        let f = Footer::parse(&b).unwrap();
        let out = f.to_bytes();
        prop_assert_eq!(&out[..64], &b[..64]);
        prop_assert_eq!(&out[68..], &b[68..]);
        prop_assert_eq!(f.checksum_ok(), out[64..68] == b[64..68]);
    }

    #[test]
    fn header_bytes_round_trip(tail in prop::collection::vec(any::<u8>(), 1016)) {
        let mut b = [0u8; 1024];
        b[..8].copy_from_slice(b"cxsparse");
        b[8..].copy_from_slice(&tail);
        let h = DynamicHeader::parse(&b).unwrap();
        let out = h.to_bytes();
        prop_assert_eq!(&out[..36], &b[..36]);
        prop_assert_eq!(&out[40..], &b[40..]);
        prop_assert_eq!(h.checksum_ok(), out[36..40] == b[36..40]);
    }
}

#[test]
fn wrong_cookies_are_format_errors() {
    let e = Footer::parse(&[0u8; 512]).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::IncorrectDataType);
    let mut b = [0u8; 512];
    b[..8].copy_from_slice(b"v_poison");
    assert!(
        Footer::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("blktap")
    );
    assert!(DynamicHeader::parse(&[0u8; 1024]).is_err());
}

// ---------------------------------------------------------------------------------------------
// Random sector writes against an in-memory model.

/// One write: first sector, sector count, fill seed.
type Write = (u64, u64, u64);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Dynamic,
    Differencing,
}

/// Disk size for a block size: a few blocks and a partial last one.
fn disk_size(block_size: u32) -> u64 {
    let bs = u64::from(block_size);
    if bs <= 4096 {
        // 512-byte blocks: 400 blocks; 4 KiB blocks: 50 blocks plus a partial one.
        200 * 1024 + 3 * 512
    } else {
        3 * bs + 5 * 512
    }
}

fn writes_strategy(block_size: u32) -> impl Strategy<Value = (Vec<Write>, bool)> {
    let sectors = disk_size(block_size) / 512;
    let max_len = (2 * u64::from(block_size) / 512 + 16).min(sectors);
    (
        prop::collection::vec((0..sectors, 1..=max_len, any::<u64>()), 1..12),
        any::<bool>(),
    )
}

/// Write through the batch API: `write_block` for every block piece of every write, one
/// `commit` and one `finish` at the end.
fn write_batched(vhd: &mut Vhd, offset: u64, data: &[u8]) {
    let bs = vhd.block_size();
    let spb = (bs / 512) as usize;
    let mut done = 0usize;
    while done < data.len() {
        let pos = offset + done as u64;
        let block = pos / bs;
        let in_block = (pos % bs) as usize;
        let n = (bs as usize - in_block).min(data.len() - done);
        let mut buf = vec![0xA5u8; bs as usize]; // unselected bytes must not reach the disk
        buf[in_block..in_block + n].copy_from_slice(&data[done..done + n]);
        let mut mask = SectorBitmap::new(spb);
        mask.set_range(in_block / 512..(in_block + n) / 512);
        vhd.write_block(block, &mut buf, &mask).unwrap();
        done += n;
    }
}

fn check_writes(kind: Kind, block_size: u32, writes: &[Write], batched: bool) {
    let dir = tempfile::tempdir().unwrap();
    let size = disk_size(block_size);
    let opts = CreateOptions::default().block_size(block_size);
    let path = dir.path().join("disk.vhd");
    let mut vhd = match kind {
        Kind::Dynamic => create::create_dynamic(&path, size, &opts).unwrap(),
        Kind::Differencing => {
            let parent = dir.path().join("parent.vhd");
            let mut p = create::create_dynamic(&parent, size, &opts).unwrap();
            p.write_at(0, &vec![0x77; 4096]).unwrap();
            drop(p);
            create::create_differencing(&path, &parent, &opts).unwrap()
        }
    };
    let mut model = vec![0u8; size as usize];
    let mut written = SectorBitmap::new((size / 512) as usize);
    for &(first, count, seed) in writes {
        let count = count.min(size / 512 - first);
        let mut data = vec![0u8; (count * 512) as usize];
        common::Rng::new(seed).fill(&mut data);
        if seed.is_multiple_of(5) {
            data.fill(0); // zero writes: a dynamic disk may skip them, a differencing one not
        }
        let off = first * 512;
        if batched {
            write_batched(&mut vhd, off, &data);
        } else {
            vhd.write_at(off, &data).unwrap();
        }
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        written.set_range(first as usize..(first + count) as usize);
    }
    if batched {
        vhd.commit().unwrap();
        vhd.finish().unwrap();
    }
    drop(vhd);

    let v = Vhd::open(&path, OpenOptions::read_only()).unwrap();
    assert!(v.warnings().is_empty(), "{:?}", v.warnings());
    let mut back = vec![0u8; size as usize];
    v.read_own(0, &mut back).unwrap();
    common::assert_same(&back, &model, &format!("{kind:?} bs {block_size}"));
    let bytes = common::read(&path);
    assert_eq!(
        bytes[..512],
        bytes[bytes.len() - 512..],
        "footer copies differ"
    );

    // Which sectors the file says it holds.
    let spb = v.sectors_per_block() as usize;
    for b in 0..v.block_count() {
        let first = b as usize * spb;
        let n = spb.min(written.len() - first);
        let want_any = written.runs_in(first..first + n, true).next().is_some();
        match v.block_map(b).unwrap() {
            BlockMap::Absent => assert!(
                !want_any || kind == Kind::Dynamic,
                "block {b} absent but written"
            ),
            BlockMap::Present {
                bitmap: Some(bm), ..
            } => {
                for s in 0..n {
                    let held = bm.get(s);
                    if kind == Kind::Differencing {
                        // Differencing: bits exactly for written sectors (§3.2).
                        assert_eq!(held, written.get(first + s), "block {b} sector {s}");
                    } else {
                        assert!(!held || written.get(first + s), "block {b} sector {s}");
                    }
                }
                // Never a bit past the end of the disk.
                assert!(bm.runs_in(n..spb, true).next().is_none(), "block {b} tail");
            }
            other => panic!("block {b}: {other:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_writes_block_512(w in writes_strategy(512)) {
        check_writes(Kind::Dynamic, 512, &w.0, w.1);
        check_writes(Kind::Differencing, 512, &w.0, w.1);
    }

    #[test]
    fn random_writes_block_4k(w in writes_strategy(4096)) {
        check_writes(Kind::Dynamic, 4096, &w.0, w.1);
        check_writes(Kind::Differencing, 4096, &w.0, w.1);
    }

    #[test]
    fn random_writes_block_512k(w in writes_strategy(512 << 10)) {
        check_writes(Kind::Dynamic, 512 << 10, &w.0, w.1);
        check_writes(Kind::Differencing, 512 << 10, &w.0, w.1);
    }

    #[test]
    fn random_writes_block_1m(w in writes_strategy(1 << 20)) {
        check_writes(Kind::Dynamic, 1 << 20, &w.0, w.1);
        check_writes(Kind::Differencing, 1 << 20, &w.0, w.1);
    }

    #[test]
    fn random_writes_block_2m(w in writes_strategy(2 << 20)) {
        check_writes(Kind::Dynamic, 2 << 20, &w.0, w.1);
        check_writes(Kind::Differencing, 2 << 20, &w.0, w.1);
    }
}

// ---------------------------------------------------------------------------------------------
// Footer variants.

/// A dynamic disk with data, and the bytes it should read.
fn disk_with_data(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join(name);
    let size = 6u64 << 20;
    let mut v = create::create_dynamic(&path, size, &CreateOptions::default()).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = common::Rng::new(511);
    for (off, len) in [(0u64, 4096u64), (3 << 20, 1 << 20), (size - 1024, 1024)] {
        let mut d = vec![0u8; len as usize];
        rng.fill(&mut d);
        v.write_at(off, &d).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&d);
    }
    (path, model)
}

fn read_all(v: &Vhd) -> Vec<u8> {
    let mut b = vec![0u8; v.virtual_size() as usize];
    v.read_own(0, &mut b).unwrap();
    b
}

fn truncate(path: &std::path::Path, by: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - by).unwrap();
}

#[test]
fn footer_of_511_bytes_opens() {
    let dir = tempfile::tempdir().unwrap();
    // Dynamic: the end footer loses its last (reserved, zero) byte.
    let (path, model) = disk_with_data(dir.path(), "short.vhd");
    truncate(&path, 1);
    let v = Vhd::open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(v.footer_source(), FooterSource::Short);
    assert!(
        v.warnings().iter().any(|w| w.contains("511-byte")),
        "{:?}",
        v.warnings()
    );
    common::assert_same(&read_all(&v), &model, "511-byte dynamic");
    drop(v);

    // Fixed: data then a 511-byte footer.
    let fixed = dir.path().join("fixed.vhd");
    let mut f = create::create_fixed(&fixed, 1 << 20, &CreateOptions::default()).unwrap();
    f.write_at(512, &[0x5A; 1024]).unwrap();
    drop(f);
    truncate(&fixed, 1);
    let v = Vhd::open(&fixed, OpenOptions::read_only()).unwrap();
    assert_eq!(v.footer_source(), FooterSource::Short);
    assert_eq!(v.virtual_size(), 1 << 20);
    let all = read_all(&v);
    assert!(all[512..1536].iter().all(|&b| b == 0x5A));
    assert!(all[..512].iter().chain(&all[1536..]).all(|&b| b == 0));
}

#[test]
fn writing_restores_a_full_end_footer() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut model) = disk_with_data(dir.path(), "short.vhd");
    truncate(&path, 1);
    let mut v = Vhd::open(&path, OpenOptions::writable()).unwrap();
    v.write_at(8192, &[9; 512]).unwrap();
    model[8192..8704].fill(9);
    drop(v);
    let v = Vhd::open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(v.footer_source(), FooterSource::End);
    assert!(v.warnings().is_empty(), "{:?}", v.warnings());
    common::assert_same(&read_all(&v), &model, "after rewrite");
}

#[test]
fn missing_or_damaged_end_footer_uses_the_copy_at_offset_0() {
    let dir = tempfile::tempdir().unwrap();
    for damage in ["truncated", "zeroed", "bad checksum"] {
        let (path, model) = disk_with_data(dir.path(), &format!("{damage}.vhd"));
        let mut bytes = common::read(&path);
        let n = bytes.len();
        match damage {
            "truncated" => bytes.truncate(n - 512),
            "zeroed" => bytes[n - 512..].fill(0),
            _ => bytes[n - 512 + 100] ^= 0xFF, // a reserved byte: parses, checksum wrong
        }
        std::fs::write(&path, &bytes).unwrap();
        let v = Vhd::open(&path, OpenOptions::read_only()).unwrap();
        assert_eq!(v.footer_source(), FooterSource::Copy, "{damage}");
        assert!(
            v.warnings().iter().any(|w| w.contains("copy at offset 0")),
            "{damage}: {:?}",
            v.warnings()
        );
        common::assert_same(&read_all(&v), &model, damage);
        drop(v);

        // Writing through it puts a good end footer back.
        let mut v = Vhd::open(&path, OpenOptions::writable()).unwrap();
        v.write_at(0, &model[..512]).unwrap();
        drop(v);
        let v = Vhd::open(&path, OpenOptions::read_only()).unwrap();
        assert_eq!(v.footer_source(), FooterSource::End, "{damage}");
        assert!(v.warnings().is_empty(), "{damage}: {:?}", v.warnings());
        common::assert_same(&read_all(&v), &model, damage);
    }
}

#[test]
fn both_footers_bad_is_an_error_naming_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = disk_with_data(dir.path(), "bad.vhd");
    let mut bytes = common::read(&path);
    let n = bytes.len();
    bytes[n - 512 + 100] ^= 0xFF;
    bytes[100] ^= 0xFF;
    std::fs::write(&path, &bytes).unwrap();
    let e = Vhd::open(&path, OpenOptions::read_only()).unwrap_err();
    assert!(e.is_checksum(), "{e}");
    assert_eq!(e.return_code(), ReturnCode::IncorrectDataType);
    assert!(e.to_string().contains("bad.vhd"), "{e}");
    let lenient = OpenOptions::read_only().lenient(true);
    let v = Vhd::open(&path, lenient).unwrap();
    assert!(v.warnings().iter().any(|w| w.contains("checksum")));
}

// ---------------------------------------------------------------------------------------------
// CHS.

/// Geometry the spec's algorithm must give, as stored by the writers of real files
/// (fixtures/ and ../shared/fixtures/real; `tests/suite/fixtures.rs` checks every file).
#[test]
fn chs_matches_real_files() {
    let known: [(u64, (u16, u8, u8), &str); 12] = [
        (104_448, (3, 4, 17), "dfvfs/image.vhd (qemu)"),
        (
            4_194_304,
            (120, 4, 17),
            "dfvfs/fat-differential.vhd (Windows 10)",
        ),
        (4_212_736, (121, 4, 17), "dfvfs/ext2.vhd (qemu)"),
        (
            4_352_000,
            (125, 4, 17),
            "freebsd-mkimg/img-1x1-4096-mbr.vhd (mkimg)",
        ),
        (
            5_242_880,
            (150, 4, 17),
            "freebsd-mkimg/img-1x1-512-mbr.vhdf (mkimg)",
        ),
        (10_485_760, (301, 4, 17), "node-vhd/fixed.vhd (Windows 10)"),
        (
            41_943_040,
            (963, 5, 17),
            "go-vhd/win8.vhd (Windows 8.1), vbox.vhd, xapi.vhd",
        ),
        (41_953_280, (964, 5, 17), "go-vhd/qemu.vhd (qemu)"),
        (
            209_715_200,
            (825, 16, 31),
            "vhdtool/win7dyn.vhd (Windows 7)",
        ),
        (
            536_870_912,
            (1040, 16, 63),
            "node-vhd/dynamic.vhd (Windows 10)",
        ),
        (
            1_073_741_824,
            (2080, 16, 63),
            "go-vhd/win8.1-1GB.vhd (Windows 8.1)",
        ),
        (
            136_365_211_648,
            (65278, 16, 255),
            "qemu-iotests/hyperv2012r2-dynamic.vhd (Hyper-V 2012 R2)",
        ),
    ];
    for (size, (c, h, s), file) in known {
        let g = Geometry::for_size(size);
        assert_eq!(
            (g.cylinders, g.heads, g.sectors_per_track),
            (c, h, s),
            "{file}"
        );
    }
    // Virtual PC's guest size for the 127 GiB file is C x H x S x 512.
    assert_eq!(Geometry::for_size(136_365_211_648).size(), 136_363_130_880);
}

// ---------------------------------------------------------------------------------------------
// Locator payloads.

#[test]
fn locator_payloads_are_read_only_inside_the_file_and_small() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhd");
    let child = dir.path().join("child.vhd");
    let p = create::create_dynamic(&parent, 4 << 20, &CreateOptions::default()).unwrap();
    for i in 0..10 {
        assert_eq!(p.read_locator_payload(i).unwrap(), None, "dynamic slot {i}");
    }
    drop(p);
    let mut c = create::create_differencing(&child, &parent, &CreateOptions::default()).unwrap();
    let h = c.header().unwrap().clone();
    let text = |i: usize, c: &Vhd| {
        let data = c.read_locator_payload(i).unwrap().unwrap();
        h.locators[i].platform_code.decode_payload(&data).unwrap()
    };
    assert_eq!(h.locators[0].platform_code, PlatformCode::W2ru);
    assert_eq!(text(0, &c), ".\\parent.vhd");
    assert_eq!(h.locators[1].platform_code, PlatformCode::W2ku);
    let abs = vhd_merge::locator::absolute(&parent).unwrap();
    assert_eq!(text(1, &c), abs.to_string_lossy());
    if cfg!(unix) {
        assert_eq!(h.locators[2].platform_code, PlatformCode::MacX);
        assert_eq!(text(2, &c), vhd_merge::locator::file_url(&abs));
    }
    assert_eq!(c.read_locator_payload(7).unwrap(), None);
    assert_eq!(c.read_locator_payload(99).unwrap(), None);

    // Outside the file, and too long: errors that say so, nothing read.
    let mut bad = h.clone();
    bad.locators[0].data_offset = 1 << 40;
    bad.locators[1].data_length = 70_000;
    c.rewrite_header(bad).unwrap();
    let e = c.read_locator_payload(0).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::IncorrectDataType);
    assert!(e.to_string().contains("outside the file"), "{e}");
    assert!(e.to_string().contains("child.vhd"), "{e}");
    let e = c.read_locator_payload(1).unwrap_err();
    assert!(e.to_string().contains("longer than"), "{e}");
    // The offset overflowing u64 is caught too.
    let mut bad = c.header().unwrap().clone();
    bad.locators[0].data_offset = u64::MAX - 2;
    c.rewrite_header(bad).unwrap();
    assert!(c.read_locator_payload(0).is_err());
}

/// Opening with `OpenOptions::default()` never writes: the file is byte-identical after opens
/// of every kind of disk and a full read.
#[test]
fn reading_never_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = disk_with_data(dir.path(), "ro.vhd");
    let before = common::read(&path);
    let v = Vhd::open(&path, OpenOptions::read_only()).unwrap();
    let _ = read_all(&v);
    assert!(!v.is_writable());
    drop(v);
    assert_eq!(common::read(&path), before);
}

// ---------------------------------------------------------------------------------------------
// Damaged metadata: never a panic, never an unbounded allocation.

/// An image held in memory (read-only use).
#[derive(Debug)]
struct Mem(Vec<u8>);

impl vhd_merge::io::Storage for Mem {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::PermissionDenied.into())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.len() as u64)
    }
    fn set_len(&self, _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::PermissionDenied.into())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A differencing disk with data in two blocks and three locators, as bytes.
fn template() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("parent.vhd");
        let child = dir.path().join("child.vhd");
        let opts = CreateOptions::default().block_size(512 << 10);
        drop(create::create_dynamic(&parent, 2 << 20, &opts).unwrap());
        let mut c = create::create_differencing(&child, &parent, &opts).unwrap();
        c.write_at(4096, &[1; 8192]).unwrap();
        c.write_at(1 << 20, &[2; 512]).unwrap();
        drop(c);
        common::read(&child)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Random bytes written over the footers, the header, the BAT, the locator data or a
    /// bitmap, and random truncation: opening (strict and lenient) and reading everything
    /// that opens either works or returns an error.
    #[test]
    fn damaged_metadata_never_panics(
        edits in prop::collection::vec((0usize..6, any::<u16>(), any::<u8>()), 1..8),
        cut in prop_oneof![Just(0usize), 1usize..3000],
    ) {
        let mut bytes = template().to_vec();
        let n = bytes.len();
        for (region, at, value) in edits {
            let r = match region {
                0 => 0..512,
                1 => 512..1536,
                2 => 1536..2048,
                3 => 2048..2048 + 3 * 4096,
                4 => n - 512..n,
                _ => 2048 + 3 * 4096..n - 512,
            };
            let i = r.start + usize::from(at) % (r.end - r.start);
            bytes[i] = value;
        }
        bytes.truncate(n - cut.min(n));
        for lenient in [false, true] {
            let opts = OpenOptions::read_only()
.lenient(lenient);
            let storage = Box::new(Mem(bytes.clone()));
            let Ok(v) = Vhd::from_storage(storage, "damaged.vhd", opts) else { continue };
            let size = v.virtual_size();
            if size <= 64 << 20 {
                let mut buf = vec![0u8; size as usize];
                let _ = v.read_own(0, &mut buf);
            }
            for slot in 0..8 {
                let _ = v.read_locator_payload(slot);
            }
            for b in 0..v.block_count().min(1 << 16) {
                let _ = v.block_map(b);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Crash safety of writes: a crash at any write (torn or not) or failed sync leaves a file that
// opens, in which every sector reads one of the contents it had during the batch, and running
// the same writes again finishes the job.

/// The writes of one batch: (offset, length, fill byte).
const CRASH_WRITES: [(u64, usize, u8); 5] = [
    (0, 4096, 0x11),               // into an existing block
    (3 << 20, 512 << 10, 0x22),    // a new block, whole
    ((1 << 20) - 512, 2048, 0x33), // across two blocks, one new
    (5 << 20, 512, 0x44),          // a new block, one sector
    ((3 << 20) + 512, 1024, 0x55), // over the second write
];

fn faulty(path: &std::path::Path, plan: std::sync::Arc<vhd_merge::io::FaultPlan>) -> Vhd {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let storage =
        vhd_merge::io::FaultyStorage::new(Box::new(vhd_merge::io::FileStorage::new(file)), plan);
    Vhd::from_storage(Box::new(storage), path, OpenOptions::writable()).unwrap()
}

fn apply(v: &mut Vhd, writes: &[(u64, usize, u8)]) -> vhd_merge::Result<()> {
    for &(off, len, b) in writes {
        v.write_at(off, &vec![b; len])?;
    }
    Ok(())
}

#[test]
fn a_crash_at_any_write_leaves_a_consistent_file() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 6 << 20;
    let opts = CreateOptions::default().block_size(512 << 10);
    for kind in [Kind::Dynamic, Kind::Differencing] {
        // The starting point: some data in block 0.
        let base = dir.path().join(format!("{kind:?}-base.vhd"));
        let mut v = match kind {
            Kind::Dynamic => create::create_dynamic(&base, size, &opts).unwrap(),
            Kind::Differencing => {
                let parent = dir.path().join("parent.vhd");
                if !parent.exists() {
                    drop(create::create_dynamic(&parent, size, &opts).unwrap());
                }
                create::create_differencing(&base, &parent, &opts).unwrap()
            }
        };
        v.write_at(0, &vec![0x0A; 8192]).unwrap();
        drop(v);
        let original = common::read(&base);

        // Every content each sector takes during the batch.
        let mut state = {
            let v = Vhd::open(&base, OpenOptions::read_only()).unwrap();
            read_all(&v)
        };
        let sectors = (size / 512) as usize;
        let mut allowed: Vec<Vec<[u8; 512]>> = (0..sectors)
            .map(|s| vec![state[s * 512..s * 512 + 512].try_into().unwrap()])
            .collect();
        for &(off, len, b) in &CRASH_WRITES {
            state[off as usize..off as usize + len].fill(b);
            for versions in &mut allowed[off as usize / 512..(off as usize + len) / 512] {
                versions.push([b; 512]);
            }
        }
        let fin = state;

        // How many writes and syncs the batch makes.
        let work = dir.path().join(format!("{kind:?}-work.vhd"));
        std::fs::write(&work, &original).unwrap();
        let plan = vhd_merge::io::FaultPlan::new();
        apply(&mut faulty(&work, plan.clone()), &CRASH_WRITES).unwrap();
        let (writes, syncs) = (plan.writes(), plan.syncs());
        assert!(writes > 10 && syncs > 5, "{writes} writes, {syncs} syncs");

        let mut plans = Vec::new();
        for n in 1..=writes {
            plans.push((
                format!("write {n}"),
                vhd_merge::io::FaultPlan::crash_at_write(n, false),
            ));
            plans.push((
                format!("torn write {n}"),
                vhd_merge::io::FaultPlan::crash_at_write(n, true),
            ));
        }
        for n in 1..=syncs {
            plans.push((
                format!("sync {n}"),
                vhd_merge::io::FaultPlan::fail_sync_at(n),
            ));
        }
        for (what, plan) in plans {
            std::fs::write(&work, &original).unwrap();
            let res = apply(&mut faulty(&work, plan.clone()), &CRASH_WRITES);
            assert!(
                res.is_err() && plan.crashed(),
                "{kind:?} {what}: the fault fired"
            );

            let v = Vhd::open(&work, OpenOptions::read_only())
                .unwrap_or_else(|e| panic!("{kind:?} crash at {what}: {e}"));
            let seen = read_all(&v);
            for s in 0..sectors {
                let got: &[u8] = &seen[s * 512..s * 512 + 512];
                assert!(
                    allowed[s].iter().any(|a| a[..] == *got),
                    "{kind:?} crash at {what}: sector {s} holds {:02x?}",
                    &got[..4]
                );
            }
            drop(v);

            // Running the same writes again finishes the job.
            let mut v = Vhd::open(&work, OpenOptions::writable()).unwrap();
            apply(&mut v, &CRASH_WRITES).unwrap();
            drop(v);
            let v = Vhd::open(&work, OpenOptions::read_only()).unwrap();
            assert!(
                v.warnings().is_empty(),
                "{kind:?} {what}: {:?}",
                v.warnings()
            );
            common::assert_same(&read_all(&v), &fin, &format!("{kind:?} rerun after {what}"));
        }
    }
}
