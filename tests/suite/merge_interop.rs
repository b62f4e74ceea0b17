//! Merged destinations read by other implementations: qemu-img for dynamic and fixed
//! destinations (it cannot read differencing disks), libvhdi for a differencing destination
//! (with 2 MiB blocks and 4 KiB-aligned data, the only shapes it reads correctly).
//!
//! A missing oracle skips the test with a note, unless VHD_MERGE_REQUIRE_ORACLES=1.

use crate::common;

use common::model::{BaseKind, ChainSpec, LayerModel, Model, build_chain};
use common::{Rng, first_diff, oracles};
use vhd_merge::bitmap::SectorBitmap;
use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic};
use vhd_merge::merge::{MergeOptions, merge};

const MIB: u32 = 1 << 20;

fn check_with_qemu(base: BaseKind, seed: u64) {
    if !oracles::require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let built = build_chain(
        dir.path(),
        &ChainSpec {
            size_sectors: 16384 + 5,
            base,
            block_sizes: vec![512 * 1024, MIB, 2 * MIB],
            density: vec![70, 60, 50],
            seed,
        },
    );
    merge(
        &built.paths[0],
        Some(&built.paths[2]),
        &MergeOptions::default(),
    )
    .unwrap();
    let raw = oracles::qemu_img_raw(&built.paths[2]).unwrap();
    let want = built.model.merged(2);
    assert!(raw.len() >= want.len(), "qemu-img gave {} bytes", raw.len());
    assert_eq!(
        first_diff(&raw[..want.len()], &want),
        None,
        "qemu-img disagrees"
    );
    assert!(raw[want.len()..].iter().all(|&b| b == 0));
}

#[test]
fn dynamic_destination_reads_the_same_in_qemu_img() {
    for seed in [1, 2, 3] {
        check_with_qemu(BaseKind::Dynamic, seed);
    }
}

#[test]
fn fixed_destination_reads_the_same_in_qemu_img() {
    for seed in [4, 5] {
        check_with_qemu(BaseKind::Fixed, seed);
    }
}

/// Write 4 KiB-aligned random chunks into every other 2 MiB block of `vhd`, mirrored into
/// `model`.
fn write_chunks(vhd: &mut vhd_merge::Vhd, model: &mut LayerModel, rng: &mut Rng) {
    let bs = 2 << 20;
    let blocks = model.data.len().div_ceil(bs);
    let mut order: Vec<usize> = (0..blocks).collect();
    rng.shuffle(&mut order);
    for b in order {
        if !rng.chance(70) {
            continue;
        }
        let mut mask = SectorBitmap::new(bs / 512);
        let mut buf = vec![0u8; bs];
        rng.fill(&mut buf);
        for chunk in 0..bs / 4096 {
            let at = b * bs + chunk * 4096;
            if at + 4096 > model.data.len() || !rng.chance(40) {
                continue;
            }
            if rng.chance(15) {
                buf[chunk * 4096..chunk * 4096 + 4096].fill(0);
            }
            mask.set_range(chunk * 8..chunk * 8 + 8);
            model.data[at..at + 4096].copy_from_slice(&buf[chunk * 4096..chunk * 4096 + 4096]);
            for s in at / 512..at / 512 + 8 {
                model.present[s] = true;
            }
        }
        vhd.write_block(b as u64, &mut buf, &mask).unwrap();
    }
    vhd.finish().unwrap();
}

#[test]
fn differencing_destination_reads_the_same_in_libvhdi() {
    if !oracles::pyvhdi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 9 << 20;
    let p = |n: &str| dir.path().join(n);
    let mut rng = Rng::new(77);
    let mut layers = vec![LayerModel::empty(size); 4];
    let names = ["src.vhd", "mid.vhd", "dest.vhd", "base.vhd"];
    let opts = CreateOptions::default();
    let mut v = create_dynamic(p(names[3]), size as u64, &opts).unwrap();
    write_chunks(&mut v, &mut layers[3], &mut rng);
    layers[3].present.fill(true);
    for i in (0..3).rev() {
        let mut v = create_differencing(p(names[i]), p(names[i + 1]), &opts).unwrap();
        write_chunks(&mut v, &mut layers[i], &mut rng);
    }
    let model = Model { size, layers };

    // libvhdi agrees with the model before the merge (a sanity check of the oracle).
    let read = |child: &str, parent: &str| -> Vec<u8> {
        oracles::libvhdi_read_chain(&[&p(child), &p(parent)]).unwrap()
    };
    assert_eq!(
        first_diff(&read("dest.vhd", "base.vhd"), &model.view(2)),
        None
    );

    merge(p("src.vhd"), Some(&p("dest.vhd")), &MergeOptions::default()).unwrap();
    let got = read("dest.vhd", "base.vhd");
    assert_eq!(
        first_diff(&got, &model.merged(2)),
        None,
        "libvhdi disagrees"
    );
    assert_eq!(got, model.view(0));
}
