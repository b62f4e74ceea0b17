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
    CreateOptions {
        block_size: BS,
        timestamp: Some(1000),
        ..CreateOptions::default()
    }
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
    let o = CreateOptions {
        creator_application: *b"tap\0",
        creator_version: 0x0001_0003,
        ..opts()
    };
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
