//! VHDX interop with tools nobody here wrote: what we create and fill, qemu-img reads
//! byte-exact and `qemu-img check` accepts (fixed and dynamic, 512-byte sectors: qemu reads no
//! other); what qemu-img creates and qemu-io fills, we read byte-exact; a differencing VHDX we
//! create over our parent and fill sector by sector, libvhdi reads byte-exact with the parent
//! set. Missing tools skip (or fail with VHD_MERGE_REQUIRE_ORACLES=1), see common::oracles.

use crate::common;

use std::path::Path;

use common::Rng;
use common::oracles::{
    libvhdi_read_chain, qemu_img_check_vhdx, qemu_img_create_vhdx, qemu_img_raw_vhdx, qemu_io_fmt,
};
use vhd_merge::bitmap::SectorBitmap;
use vhd_merge::io::Storage;
use vhd_merge::vhdx::Vhdx;
use vhd_merge::vhdx::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};

const M: u64 = 1 << 20;

fn opts(block: u32) -> CreateOptions {
    CreateOptions::default()
        .block_size(Some(block))
        .logical_sector_size(512)
        .force(false)
}

/// Random runs of random data (whole sectors) written with `write_at`, mirrored in `expected`;
/// a commit after every few writes.
fn fill<S: Storage>(v: &mut Vhdx<S>, expected: &mut [u8], rng: &mut Rng, writes: usize) {
    let sectors = v.virtual_size() / 512;
    for i in 0..writes {
        let first = rng.below(sectors);
        let count = 1 + rng.below((sectors - first).min(5000));
        let mut data = vec![0u8; count as usize * 512];
        rng.fill(&mut data);
        v.write_at(first * 512, &data).unwrap();
        expected[first as usize * 512..][..data.len()].copy_from_slice(&data);
        if i % 3 == 2 {
            v.commit().unwrap();
        }
    }
    v.finish().unwrap();
}

#[test]
fn qemu_reads_fixed_and_dynamic_vhdx_we_create_and_fill() {
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    for (fixed, block, size) in [
        (false, M as u32, 9 * M + 512 * 7),
        (false, 32 << 20, 70 * M),
        (true, 2 << 20, 9 * M),
        (true, M as u32, 5 * M + 4096),
    ] {
        let path = dir.path().join(format!("ours-{fixed}-{block}.vhdx"));
        let mut v = if fixed {
            create_fixed(&path, size, &opts(block)).unwrap()
        } else {
            create_dynamic(&path, size, &opts(block)).unwrap()
        };
        let mut expected = vec![0u8; size as usize];
        fill(&mut v, &mut expected, &mut Rng::new(u64::from(block)), 12);
        drop(v);
        let what = format!("fixed {fixed}, {block}-byte blocks, {size} bytes");
        let Some(res) = qemu_img_check_vhdx(&path) else {
            return;
        };
        res.unwrap_or_else(|e| panic!("{what}: qemu-img check: {e}"));
        let raw = qemu_img_raw_vhdx(&path).expect("qemu-img");
        common::assert_same(&raw, &expected, &what);
    }
}

#[test]
fn we_read_vhdx_that_qemu_creates_and_fills() {
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let writes = [
        "write -P 0xa5 0 3M",
        "write -P 0x5a 5M 1536k",
        "write -P 0x11 12800512 4096",
        "write -P 0x77 41942528 512",
    ]
    .map(String::from);
    for block in ["1M", "8M", "32M", "256M"] {
        for zero in ["on", "off"] {
            for subformat in ["dynamic", "fixed"] {
                if subformat == "fixed" && block != "8M" {
                    continue;
                }
                let path = dir
                    .path()
                    .join(format!("q-{block}-{zero}-{subformat}.vhdx"));
                let o = format!("block_size={block},block_state_zero={zero},subformat={subformat}");
                if qemu_img_create_vhdx(&path, &o, "41943552").is_none() {
                    return;
                }
                if qemu_io_fmt("vhdx", &path, &writes).is_none() {
                    return;
                }
                let expected = qemu_img_raw_vhdx(&path).expect("qemu-img");
                let v = Vhdx::open_path(&path, false).unwrap_or_else(|e| panic!("{o}: {e}"));
                let mut ours = vec![0u8; v.virtual_size() as usize];
                v.read_own(0, &mut ours).unwrap();
                common::assert_same(&ours, &expected, &o);
                assert_eq!(
                    ours[5 * M as usize],
                    0x5a,
                    "{o}: the written pattern is there"
                );
            }
        }
    }
}

/// Sector-granular masked writes into a child: each sector written, or kept, at random.
fn fill_child<S: Storage>(v: &mut Vhdx<S>, expected: &mut [u8], rng: &mut Rng) {
    for i in 0..24 {
        let block = rng.below(v.block_count());
        let in_block = v.sectors_in_block(block);
        let first = rng.below(in_block);
        let count = 1 + rng.below((in_block - first).min(300));
        let mut mask = SectorBitmap::full(count as usize);
        for s in 0..count as usize {
            if rng.chance(30) {
                mask.clear_range(s..s + 1);
            }
        }
        let mut data = vec![0u8; count as usize * 512];
        rng.fill(&mut data);
        v.write_sectors(block, first, &data, &mask).unwrap();
        let at = (block * v.block_size() / 512 + first) as usize;
        for run in mask.runs() {
            expected[(at + run.start) * 512..(at + run.end) * 512]
                .copy_from_slice(&data[run.start * 512..run.end * 512]);
        }
        if i % 5 == 4 {
            v.commit().unwrap();
        }
    }
    v.finish().unwrap();
}

#[test]
fn libvhdi_reads_a_differencing_vhdx_we_create_and_fill() {
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhdx");
    let child = dir.path().join("child.avhdx");
    let size = 10 * M + 512 * 3;
    let mut p = create_dynamic(&parent, size, &opts(2 << 20)).unwrap();
    let mut expected = vec![0u8; size as usize];
    let mut rng = Rng::new(99);
    fill(&mut p, &mut expected, &mut rng, 8);
    drop(p);
    // Hyper-V's 2 MiB child blocks; no whole-block zero writes (no ZERO blocks in the child:
    // libvhdi misreads ZERO and UNMAPPED blocks of differencing disks).
    let mut c = create_differencing(&child, &parent, &CreateOptions::default()).unwrap();
    fill_child(&mut c, &mut expected, &mut rng);
    drop(c);
    let Some(got) = libvhdi_read_chain(&[&child, &parent]) else {
        return;
    };
    common::assert_same(&got, &expected, "libvhdi, child over parent");
    check_parent_untouched(&parent, &child);
}

/// The child still links to the parent (whose DataWriteGuid filling the child never changed).
fn check_parent_untouched(parent: &Path, child: &Path) {
    let p = Vhdx::open_path(parent, false).unwrap();
    let c = Vhdx::open_path(child, false).unwrap();
    let linkage = c.parent_locator().unwrap().parent_linkage().unwrap();
    assert_eq!(linkage, p.data_write_guid());
}
