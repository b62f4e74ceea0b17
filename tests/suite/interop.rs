//! Interoperability against tools nobody here wrote:
//!
//! - fixed and dynamic VHDs created and filled by vhd-merge read byte-exact by
//!   `qemu-img convert -f vpc -O raw`;
//! - VHDs created by `qemu-img create` (both subformats, with and without `force_size`) and
//!   filled by `qemu-io` read byte-exact by vhd-merge;
//! - a differencing child created and filled by vhd-merge read byte-exact by libvhdi with its
//!   parent set (2 MiB blocks and 4 KiB-aligned writes: libvhdi misreads anything else).
//!
//! qemu-img is never the oracle for a differencing disk: it ignores the parent.

use crate::common;

use std::path::Path;

use common::{Rng, assert_same, oracles, read_own};
use vhd_merge::create::{self, CreateOptions};
use vhd_merge::{Chain, ChainOptions, DiskType, OpenOptions, Vhd};

/// Apply `count` random writes (offsets and lengths multiples of `align`, data random) to both
/// `vhd` and `model`. Some writes overlap earlier ones.
fn random_writes(vhd: &mut Vhd, model: &mut [u8], rng: &mut Rng, count: usize, align: u64) {
    let size = model.len() as u64;
    let units = size / align;
    let mut earlier: Vec<(u64, u64)> = Vec::new();
    for i in 0..count {
        let len_units = 1 + rng.below(600 * 512 / align);
        let start_units = if i % 4 == 3 && !earlier.is_empty() {
            // Overlap an earlier write.
            let (o, l) = earlier[rng.below(earlier.len() as u64) as usize];
            (o + rng.below(l)) / align
        } else {
            rng.below(units)
        };
        let start = start_units.min(units - 1) * align;
        let len = (len_units * align).min(size - start);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        vhd.write_at(start, &data).unwrap();
        model[start as usize..(start + len) as usize].copy_from_slice(&data);
        earlier.push((start, len));
    }
}

/// The file has identical footers at offset 0 and at the end (sparse disks), and reopening it
/// gives no warnings.
fn assert_clean(path: &Path) {
    let bytes = common::read(path);
    let v = Vhd::open(path, OpenOptions::read_only()).unwrap();
    assert!(
        v.warnings().is_empty(),
        "{}: {:?}",
        path.display(),
        v.warnings()
    );
    assert_eq!(v.footer_offset(), bytes.len() as u64 - 512);
    if v.disk_type() != DiskType::Fixed {
        assert_eq!(
            bytes[..512],
            bytes[bytes.len() - 512..],
            "{}: footer copy at 0 differs from the end footer",
            path.display()
        );
        // New blocks are 4 KiB aligned after their bitmap (§7.16).
        let h = v.header().unwrap();
        for e in v.bat().unwrap().entries.iter().filter(|&&e| e != u32::MAX) {
            let data = u64::from(*e) * 512 + h.bitmap_bytes();
            assert!(
                data.is_multiple_of(4096),
                "{}: block data at {data}",
                path.display()
            );
        }
    }
}

#[test]
fn vhd_merge_images_read_byte_exact_by_qemu_img() {
    if !oracles::require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Not a whole number of blocks: the last block is partial for every block size here.
    let size = (21 << 20) + 7 * 512;
    let cases: [(&str, Option<u32>); 4] = [
        ("fixed", None),
        ("dyn-512k", Some(512 << 10)),
        ("dyn-2m", Some(2 << 20)),
        ("dyn-4m", Some(4 << 20)),
    ];
    for (seed, (name, block_size)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("{name}.vhd"));
        let mut vhd = match block_size {
            None => create::create_fixed(&path, size, &CreateOptions::default()).unwrap(),
            Some(bs) => {
                let o = CreateOptions::default().block_size(bs);
                create::create_dynamic(&path, size, &o).unwrap()
            }
        };
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng::new(0x5eed_0000 + seed as u64);
        random_writes(&mut vhd, &mut model, &mut rng, 48, 512);
        // The last sector of the disk, in the partial last block.
        let last = vec![0xEE; 512];
        vhd.write_at(size - 512, &last).unwrap();
        model[(size - 512) as usize..].copy_from_slice(&last);
        drop(vhd);

        assert_clean(&path);
        let qemu = oracles::qemu_img_raw(&path).unwrap();
        assert_same(&qemu, &model, &format!("qemu-img reading {name}"));
        assert_same(
            &read_own(&path),
            &model,
            &format!("vhd-merge reading {name}"),
        );
    }
}

/// One qemu-io `write -P` pattern: (byte, offset, length).
type Pattern = (u8, u64, u64);

fn qemu_patterns(size: u64) -> Vec<Pattern> {
    let mut rng = Rng::new(0xC0FFEE);
    let mut out = vec![
        (0x11, 0, 512),
        (0x22, 512 * 3, 512 * 5),
        // Crosses the first 2 MiB block boundary.
        (0x33, (2 << 20) - 4096, 8192),
        // Overwrites part of the previous one.
        (0x44, (2 << 20) - 1024, 1536),
        (0x55, size - 512, 512),
    ];
    for i in 0..12u8 {
        let off = rng.below(size / 512 - 64) * 512;
        let len = (1 + rng.below(64)) * 512;
        out.push((0x60 + i, off, len));
    }
    out
}

#[test]
fn qemu_img_images_read_byte_exact_by_vhd_merge() {
    if !oracles::require_tool("qemu-img") || !oracles::require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for subformat in ["dynamic", "fixed"] {
        for force_size in [false, true] {
            let name = format!("{subformat}-{force_size}");
            let path = dir.path().join(format!("{name}.vhd"));
            let mut opts = format!("subformat={subformat}");
            if force_size {
                opts.push_str(",force_size=on");
            }
            oracles::qemu_img_create(&path, &opts, "40M").unwrap();
            let qemu_size = oracles::qemu_img_virtual_size(&path).unwrap().unwrap();
            let v = Vhd::open(&path, OpenOptions::read_only()).unwrap();
            assert_eq!(v.virtual_size(), qemu_size, "{name}: size");
            let creator = if force_size { "qem2" } else { "qemu" };
            assert_eq!(v.footer().creator_application_str(), creator);
            if force_size {
                assert_eq!(qemu_size, 40 << 20, "force_size keeps the exact size");
            } else {
                // qemu rounds 40 MiB up to a CHS-exact size (§1.5).
                assert_eq!(qemu_size, 41_953_280);
            }
            drop(v);

            let patterns = qemu_patterns(qemu_size);
            let cmds: Vec<String> = patterns
                .iter()
                .map(|(b, off, len)| format!("write -P {b:#04x} {off} {len}"))
                .collect();
            oracles::qemu_io(&path, &cmds).unwrap();
            let mut model = vec![0u8; qemu_size as usize];
            for (b, off, len) in patterns {
                model[off as usize..(off + len) as usize].fill(b);
            }

            let v = Vhd::open(&path, OpenOptions::read_only()).unwrap();
            assert!(v.warnings().is_empty(), "{name}: {:?}", v.warnings());
            if subformat == "dynamic" {
                assert!(v.allocated_blocks() > 3, "{name}: qemu allocated blocks");
            }
            drop(v);
            assert_same(
                &read_own(&path),
                &model,
                &format!("vhd-merge reading {name}"),
            );
            // And qemu agrees with the model, so the model is what qemu wrote.
            let qemu = oracles::qemu_img_raw(&path).unwrap();
            assert_same(&qemu, &model, &format!("qemu-img reading {name}"));
        }
    }
}

/// A vhd-merge differencing child (2 MiB blocks, 4 KiB-aligned writes) over a vhd-merge
/// parent, read by libvhdi with its parent set, for a dynamic and a fixed parent.
#[test]
fn differencing_child_read_byte_exact_by_libvhdi() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 24 << 20;
    for (seed, parent_kind) in ["dynamic", "fixed"].into_iter().enumerate() {
        let parent = dir.path().join(format!("parent-{parent_kind}.vhd"));
        let child = dir.path().join(format!("child-{parent_kind}.vhd"));
        let opts = CreateOptions::default();
        let mut p = if parent_kind == "fixed" {
            create::create_fixed(&parent, size, &opts).unwrap()
        } else {
            create::create_dynamic(&parent, size, &opts).unwrap()
        };
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng::new(0xD1FF + seed as u64);
        random_writes(&mut p, &mut model, &mut rng, 24, 4096);
        drop(p);
        let parent_model = model.clone();

        let mut c = create::create_differencing(&child, &parent, &opts).unwrap();
        assert_eq!(c.header().unwrap().block_size, 2 << 20);
        random_writes(&mut c, &mut model, &mut rng, 40, 4096);
        drop(c);
        assert_clean(&child);
        assert_ne!(model, parent_model, "the child changes something");

        // Our own chain read gives the model (with or without libvhdi)...
        let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
        assert_eq!(chain.len(), 2);
        let mut ours = vec![0u8; size as usize];
        chain.read_at(0, 0, &mut ours).unwrap();
        assert_same(
            &ours,
            &model,
            &format!("vhd-merge chain over {parent_kind}"),
        );

        // ... and so does libvhdi.
        let Some(seen) = oracles::libvhdi_read_chain(&[&child, &parent]) else {
            continue;
        };
        assert_same(
            &seen,
            &model,
            &format!("libvhdi reading child over {parent_kind}"),
        );
        let seen = oracles::libvhdi_read_chain(&[&parent]).unwrap();
        assert_same(
            &seen,
            &parent_model,
            &format!("libvhdi reading {parent_kind} parent"),
        );
    }
}

/// libvhdi reads the parent name and id we write into a child the way we meant them.
#[test]
fn libvhdi_sees_our_parent_identity() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("base disk.vhd");
    let child = dir.path().join("child.vhd");
    let p = create::create_dynamic(&parent, 8 << 20, &CreateOptions::default()).unwrap();
    let pid = p.unique_id();
    drop(p);
    drop(create::create_differencing(&child, &parent, &CreateOptions::default()).unwrap());
    let Some(out) = oracles::libvhdi_python(
        "import sys, pyvhdi\nf = pyvhdi.file()\nf.open(sys.argv[1])\n\
         print(f.get_parent_filename())\nprint(f.get_parent_identifier())\n\
         print(f.get_disk_type())\nprint(f.get_media_size())",
        &[&child],
    ) else {
        return;
    };
    let text = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "base disk.vhd");
    assert_eq!(lines[1], pid.to_string());
    assert_eq!(lines[2], "4", "libvhdi disk type for differencing");
    assert_eq!(lines[3], (8u64 << 20).to_string());
}
