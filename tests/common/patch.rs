//! Small disks with known content for the reliability tests (check, repair, bad input, fuzz
//! regressions, untrusted files), and byte-level patching of their structures.

use std::fs;
use std::path::{Path, PathBuf};

use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
use vhd_merge::format::{DynamicHeader, Footer};

use super::read;

/// Block size of the test disks: 64 KiB, 16 blocks in 1 MiB.
pub const BS: u32 = 64 << 10;
/// Virtual size of the test disks.
pub const SIZE: u64 = 1 << 20;

pub fn opts() -> CreateOptions {
    CreateOptions::default()
        .block_size(BS)
        .timestamp(Some(1000))
}

/// A dynamic disk with blocks 0, 1 and 5 allocated (block 1 only partly written).
pub fn dynamic(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut v = create_dynamic(&p, SIZE, &opts()).unwrap();
    v.write_at(0, &vec![0x11; BS as usize]).unwrap();
    v.write_at(u64::from(BS) + 4096, &[0x22; 8192]).unwrap();
    v.write_at(5 * u64::from(BS), &[0x55; 512]).unwrap();
    p
}

/// A fixed disk of 64 KiB with some data.
pub fn fixed(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut v = create_fixed(&p, 64 << 10, &opts()).unwrap();
    v.write_at(512, &[0x42; 1024]).unwrap();
    p
}

/// A differencing child of `parent` with one sector written.
pub fn child(dir: &Path, name: &str, parent: &Path) -> PathBuf {
    let p = dir.join(name);
    let mut c = create_differencing(&p, parent, &opts()).unwrap();
    c.write_at(2048, &[0x99; 512]).unwrap();
    p
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Overwrite bytes at `offset` (through the library's positional writes, on every OS).
pub fn patch(p: &Path, offset: u64, bytes: &[u8]) {
    use vhd_merge::io::{FileStorage, Storage};
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    FileStorage::new(f).write_at(bytes, offset).unwrap();
}

pub fn truncate(p: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Header offset (footer Data Offset) of a sparse file.
pub fn header_offset(p: &Path) -> u64 {
    be64(&read(p), 16)
}

/// Change the footer with `f` and write it, with a correct checksum, at the end and at 0
/// (for sparse disks).
pub fn edit_footer(p: &Path, f: impl Fn(&mut Footer)) {
    let b = read(p);
    let len = b.len();
    let mut footer = Footer::parse(b[len - 512..].try_into().unwrap()).unwrap();
    f(&mut footer);
    let nb = footer.to_bytes();
    patch(p, len as u64 - 512, &nb);
    if footer.disk_type.is_sparse() {
        patch(p, 0, &nb);
    }
}

/// Change the dynamic header with `f` and write it back with a correct checksum.
pub fn edit_header(p: &Path, f: impl Fn(&mut DynamicHeader)) {
    let b = read(p);
    let off = be64(&b, 16) as usize;
    let mut h = DynamicHeader::parse(b[off..off + 1024].try_into().unwrap()).unwrap();
    f(&mut h);
    patch(p, off as u64, &h.to_bytes());
}

/// The dynamic header.
pub fn header(p: &Path) -> DynamicHeader {
    let b = read(p);
    let off = be64(&b, 16) as usize;
    DynamicHeader::parse(b[off..off + 1024].try_into().unwrap()).unwrap()
}

/// BAT entry `i`.
pub fn bat_entry(p: &Path, i: u64) -> u32 {
    let h = header(p);
    be32(&read(p), (h.table_offset + 4 * i) as usize)
}

/// Set BAT entry `i`.
pub fn set_bat_entry(p: &Path, i: u64, v: u32) {
    let h = header(p);
    patch(p, h.table_offset + 4 * i, &v.to_be_bytes());
}

/// A blktap-style disk of the test size and block size: creator `tap\0`, a `tdbatmap` header
/// right after the BAT and the map at `map_offset`.
pub fn tap_file(dir: &Path, map_offset: u64) -> std::path::PathBuf {
    let p = dir.join("tap.vhd");
    let o = opts()
        .creator_application(*b"tap\0")
        .creator_version(0x0001_0003);
    drop(create_dynamic(&p, SIZE, &o).unwrap());
    // Make room for the batmap: move the footer out.
    let footer = read(&p)[..512].to_vec();
    let end = (map_offset + 512).max(256 << 10);
    truncate(&p, end);
    patch(&p, end, &footer);
    let h = header(&p);
    let at = h.table_offset + 512;
    let mut bh = [0u8; 512];
    bh[..8].copy_from_slice(b"tdbatmap");
    bh[8..16].copy_from_slice(&map_offset.to_be_bytes());
    bh[16..20].copy_from_slice(&1u32.to_be_bytes());
    bh[20..24].copy_from_slice(&0x0001_0002u32.to_be_bytes());
    bh[24..28].copy_from_slice(&(!0u32).to_be_bytes());
    patch(&p, at, &bh);
    patch(&p, map_offset, &[0; 512]);
    p
}

/// Write the batmap bits `map` at `map_offset` and their checksum into the batmap header.
pub fn set_batmap(p: &Path, map_offset: u64, map: &[u8]) {
    let h = header(p);
    let sum = map.iter().fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
    patch(p, h.table_offset + 512 + 24, &(!sum).to_be_bytes());
    patch(p, map_offset, map);
}

// ---- VHDX: patching closed files (no log: the file must be clean, LogGuid zero). ----

use vhd_merge::vhdx::Vhdx;
use vhd_merge::vhdx::format::bat::{BatEntry, Geometry, PayloadState};
use vhd_merge::vhdx::format::metadata::{MetadataTable, VIRTUAL_DISK_SIZE};

/// Set the payload BAT entry of `block` of the closed VHDX at `p` to `state`, keeping its
/// file offset: an UNMAPPED or UNDEFINED block may keep the space it owned ("soft-anchored",
/// [MS-VHDX] 2.5.1.1), and one that owned none keeps offset 0.
pub fn vhdx_set_block_state(p: &Path, block: u64, state: PayloadState) {
    let v = Vhdx::open_path(p, false).unwrap();
    assert!(
        v.reader().header.header.log_guid.is_nil(),
        "patching a dirty VHDX"
    );
    let e = v.payload_entry(block).unwrap();
    let at = v.reader().regions.bat.file_offset + v.geometry().payload_index(block) * 8;
    drop(v);
    let new = BatEntry::new(state.value(), e.file_offset_mb());
    patch(p, at, &new.0.to_le_bytes());
}

/// Set the Virtual Disk Size metadata item of the closed VHDX at `p` to `size` (the metadata
/// region has no checksum). The BAT region must already hold the entries `size` needs.
pub fn vhdx_set_virtual_size(p: &Path, size: u64) {
    let v = Vhdx::open_path(p, false).unwrap();
    let (r, g) = (v.reader(), v.geometry());
    let new = Geometry::new(size, g.block_size, g.logical_sector_size, g.has_parent).unwrap();
    let bat = r.regions.bat;
    new.check_bat_region(bat.length.into()).unwrap();
    let region = r.regions.metadata;
    drop(v);
    let mut head = vec![0u8; 64 << 10];
    let file = vhd_merge::io::FileStorage::new(fs::File::open(p).unwrap());
    vhd_merge::io::Storage::read_at(&file, &mut head, region.file_offset).unwrap();
    let table = MetadataTable::parse(&head, region.length.into()).unwrap();
    let item = table
        .entries
        .iter()
        .find(|e| e.item_id == VIRTUAL_DISK_SIZE)
        .expect("a Virtual Disk Size item");
    patch(
        p,
        region.file_offset + u64::from(item.offset),
        &size.to_le_bytes(),
    );
}

/// Replace the parent locator value `old` of the closed VHDX at `p` by `new` (UTF-16LE, the
/// same length: a `{guid}` by another), found in its metadata region.
pub fn vhdx_replace_locator_value(p: &Path, old: &str, new: &str) {
    assert_eq!(old.len(), new.len(), "same length only");
    let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let v = Vhdx::open_path(p, false).unwrap();
    let region = v.reader().regions.metadata;
    drop(v);
    let bytes = read(p);
    let meta = &bytes[region.range().start as usize..region.range().end as usize];
    let needle = utf16(old);
    let at = meta
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{old} is not in the metadata region"));
    patch(p, region.file_offset + at as u64, &utf16(new));
}
