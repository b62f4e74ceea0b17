//! flatten: random chains against an in-test model, outputs read back by qemu-img and by the
//! crate, and the output-file rules (refusal, force, temporary name, progress).

use crate::common;

use std::path::{Path, PathBuf};

use common::craft::{ChildSpec, craft_child};
use common::model::{LayerModel, compose};
use common::oracles;
use common::{Rng, fast_tempdir};
use proptest::prelude::*;
use vhd_merge::create::{CreateOptions, create_dynamic, create_fixed};
use vhd_merge::format::{PlatformCode, SectorBitmap};
use vhd_merge::{
    Chain, ChainOptions, FlattenFormat, FlattenOptions, OpenOptions, ReturnCode, Vhd, flatten,
    flatten_path,
};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

/// Random writes into a model layer: a few extents at sector granularity, some all zero.
fn random_writes(rng: &mut Rng, m: &mut LayerModel, max_extents: u64) {
    let sectors = m.size() as u64 / 512;
    for _ in 0..rng.below(max_extents + 1) {
        let start = rng.below(sectors);
        let len = (1 + rng.below(1024)).min(sectors - start);
        let range = start as usize * 512..(start + len) as usize * 512;
        if rng.below(5) == 0 {
            m.data[range].fill(0);
        } else {
            rng.fill(&mut m.data[range]);
        }
        for s in start..start + len {
            m.present[s as usize] = true;
        }
    }
}

/// Write the model's present sectors into `v`, block by block in a shuffled order (so blocks
/// land in the file out of order), then finish.
fn write_layer(rng: &mut Rng, v: &mut Vhd, m: &LayerModel) {
    let bs = v.block_size();
    let spb = (bs / 512) as usize;
    let mut blocks: Vec<u64> = (0..v.block_count()).collect();
    rng.shuffle(&mut blocks);
    let mut buf = vec![0u8; bs as usize];
    for b in blocks {
        let first = (b * bs / 512) as usize;
        let mut mask = SectorBitmap::new(spb);
        for i in 0..spb {
            let s = first + i;
            let written = s < m.present.len() && m.present[s];
            if written {
                mask.set(i);
                buf[i * 512..i * 512 + 512].copy_from_slice(&m.data[s * 512..s * 512 + 512]);
            }
        }
        if !mask.none() {
            v.write_block(b, &mut buf, &mask).unwrap();
        }
        if rng.below(4) == 0 {
            v.commit().unwrap();
        }
    }
    v.finish().unwrap();
}

const BLOCK_SIZES: [u32; 3] = [512 * 1024, 1 << 20, 2 << 20];

/// A random chain of `depth` layers in `dir`; returns the top's path and the model, child
/// first.
fn random_chain(
    dir: &Path,
    seed: u64,
    depth: usize,
    fixed_base: bool,
) -> (PathBuf, Vec<LayerModel>) {
    let mut rng = Rng::new(seed);
    let mut models: Vec<LayerModel> = Vec::new();
    let mut prev: Option<PathBuf> = None;
    for i in 0..depth {
        // 1..4 MiB in whole sectors, rarely block aligned: ancestors smaller and larger.
        let size = (MIB + rng.below(3 * MIB)) / 512 * 512;
        let mut m = LayerModel::empty(size as usize);
        let block_size = BLOCK_SIZES[rng.below(3) as usize];
        let path = dir.join(format!("l{i}.vhd"));
        let mut v = match &prev {
            None if fixed_base => {
                let v = create_fixed(&path, size, &CreateOptions::default()).unwrap();
                random_writes(&mut rng, &mut m, 6);
                v
            }
            None => {
                let opts = CreateOptions::default().block_size(block_size);
                let v = create_dynamic(&path, size, &opts).unwrap();
                random_writes(&mut rng, &mut m, 6);
                v
            }
            Some(parent) => {
                let mut spec = ChildSpec::of(parent).loc(
                    PlatformCode::W2ru,
                    &format!(".\\{}", parent.file_name().unwrap().to_string_lossy()),
                );
                spec.size = size;
                spec.block_size = block_size;
                let v = craft_child(&path, &spec);
                random_writes(&mut rng, &mut m, 6);
                v
            }
        };
        write_layer(&mut rng, &mut v, &m);
        drop(v);
        if fixed_base && prev.is_none() {
            // Every sector of a fixed disk is its own, zero where nothing was written.
            m.present.fill(true);
        }
        models.push(m);
        prev = Some(path);
    }
    models.reverse();
    (prev.unwrap(), models)
}

fn opts(format: FlattenFormat) -> FlattenOptions<'static> {
    FlattenOptions::default().format(format)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn flatten_equals_the_model(seed in any::<u64>(), depth in 1usize..=8, fixed_base in any::<bool>()) {
        let dir = fast_tempdir();
        let (top, models) = random_chain(dir.path(), seed, depth, fixed_base);
        let want = compose(&models);
        let chain = Chain::open(&top, &ChainOptions::default()).unwrap();
        prop_assert_eq!(chain.len(), depth);
        let out = dir.path().join("out.raw");
        let r = flatten(&chain, &out, opts(FlattenFormat::Raw)).unwrap();
        prop_assert_eq!(r.virtual_size, models[0].size() as u64);
        let got = std::fs::read(&out).unwrap();
        prop_assert_eq!(got.len(), want.len());
        prop_assert!(got == want, "raw flatten differs from the model");
        // The dynamic output reads back the same through the crate.
        let out = dir.path().join("out.vhd");
        flatten(&chain, &out, opts(FlattenFormat::Dynamic)).unwrap();
        let v = Vhd::open(&out, OpenOptions::read_only()).unwrap();
        prop_assert_eq!(v.disk_type(), vhd_merge::DiskType::Dynamic);
        let mut back = vec![0u8; want.len()];
        v.read_own(0, &mut back).unwrap();
        prop_assert!(back == want, "dynamic flatten differs from the model");
        // Only blocks holding a non-zero byte are allocated.
        let bs = v.block_size() as usize;
        let nonzero = want.chunks(bs).filter(|c| c.iter().any(|&b| b != 0)).count();
        prop_assert_eq!(v.allocated_blocks(), nonzero);
    }
}

#[test]
fn qemu_img_reads_fixed_and_dynamic_outputs() {
    let qemu = oracles::require_tool("qemu-img");
    for (seed, depth, fixed_base, bs) in [
        (0x5EED, 6, false, 512 * 1024),
        (0xBEEF, 8, true, 2 << 20),
        (0xF00D, 3, false, 1 << 20),
    ] {
        let dir = fast_tempdir();
        let (top, models) = random_chain(dir.path(), seed, depth, fixed_base);
        let want = compose(&models);
        let chain = Chain::open(&top, &ChainOptions::default()).unwrap();
        let raw = dir.path().join("o.raw");
        flatten(&chain, &raw, opts(FlattenFormat::Raw)).unwrap();
        let raw = std::fs::read(&raw).unwrap();
        assert!(raw == want);
        let fixed = dir.path().join("o-fixed.vhd");
        flatten(&chain, &fixed, opts(FlattenFormat::Fixed)).unwrap();
        let dynamic = dir.path().join("o-dyn.vhd");
        let r = flatten(
            &chain,
            &dynamic,
            opts(FlattenFormat::Dynamic).block_size(Some(bs)),
        )
        .unwrap();
        assert!(r.blocks_allocated > 0);
        // Fixed output: raw bytes then a footer.
        let f = std::fs::read(&fixed).unwrap();
        assert_eq!(f.len(), raw.len() + 512);
        assert!(f[..raw.len()] == raw[..]);
        let v = Vhd::open(&fixed, OpenOptions::read_only()).unwrap();
        assert_eq!(v.disk_type(), vhd_merge::DiskType::Fixed);
        if !qemu {
            continue;
        }
        assert!(
            oracles::qemu_img_raw(&fixed).unwrap() == raw,
            "seed {seed:#x}: qemu-img reads the fixed output differently"
        );
        assert!(
            oracles::qemu_img_raw(&dynamic).unwrap() == raw,
            "seed {seed:#x}: qemu-img reads the dynamic output differently"
        );
    }
}

#[test]
fn output_rules() {
    let dir = fast_tempdir();
    let (top, models) = random_chain(dir.path(), 7, 3, true);
    let want = compose(&models);
    let chain = Chain::open(&top, &ChainOptions::default()).unwrap();
    let out = dir.path().join("out.raw");
    std::fs::write(&out, b"precious").unwrap();
    // Existing output: refused, untouched.
    let e = flatten(&chain, &out, opts(FlattenFormat::Raw)).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::InvalidParameter);
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    // Forced: replaced.
    flatten(&chain, &out, opts(FlattenFormat::Raw).force(true)).unwrap();
    assert!(std::fs::read(&out).unwrap() == want);
    // One of the chain's files: refused even with force, also through another name.
    let inputs: Vec<Vec<u8>> = chain
        .layers()
        .iter()
        .map(|l| std::fs::read(l.layer.path()).unwrap())
        .collect();
    let base = chain.vhd(2).unwrap().path().to_path_buf();
    let alias = dir.path().join("alias.vhd");
    std::fs::hard_link(&base, &alias).unwrap();
    for target in [top.clone(), base.clone(), alias] {
        let e = flatten(&chain, &target, opts(FlattenFormat::Dynamic).force(true)).unwrap_err();
        assert!(e.to_string().contains("a file of the chain"), "{e}");
    }
    for (l, before) in chain.layers().iter().zip(&inputs) {
        assert!(
            &std::fs::read(l.layer.path()).unwrap() == before,
            "an input changed"
        );
    }
    // A failure leaves nothing behind: no output, no temporary file.
    let missing = dir.path().join("no-such-dir").join("out.vhd");
    assert!(flatten(&chain, &missing, opts(FlattenFormat::Dynamic)).is_err());
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    // A directory as output.
    let e = flatten(&chain, dir.path(), opts(FlattenFormat::Raw).force(true)).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::InvalidParameter);
}

#[test]
fn progress_and_layers() {
    let dir = fast_tempdir();
    let (top, models) = random_chain(dir.path(), 99, 4, false);
    let mut calls: Vec<(u64, u64)> = Vec::new();
    let mut data: Vec<(u64, u64)> = Vec::new();
    let mut cb = |p: &vhd_merge::FlattenProgress| {
        calls.push((p.position, p.virtual_size));
        data.push((p.data_done, p.data_total));
    };
    let out = dir.path().join("p.vhd");
    let r = flatten_path(
        &top,
        &ChainOptions::default(),
        &out,
        FlattenOptions::default()
            .progress(Some(&mut cb))
            .block_size(Some(512 * 1024)),
    )
    .unwrap();
    assert_eq!(r.format, FlattenFormat::Dynamic);
    assert_eq!(r.layers, 4);
    let total = models[0].size() as u64;
    assert!(calls.len() >= (total / (512 * KIB)) as usize);
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    assert!(calls.iter().all(|&(_, t)| t == total));
    assert_eq!(calls.last(), Some(&(total, total)));
    // The data to copy: spans some layer has a block in, counted up to the same total; the
    // output's data (non-zero spans) is part of it.
    let data_total = data[0].1;
    assert!(data_total <= total, "{data_total} of {total}");
    assert!(
        data_total >= r.data_bytes,
        "{data_total} < {}",
        r.data_bytes
    );
    assert!(data.windows(2).all(|w| w[0].0 <= w[1].0));
    assert!(data.iter().all(|&(_, t)| t == data_total));
    assert_eq!(data.last(), Some(&(data_total, data_total)));
    // Flattening an inner layer gives that layer's view.
    let chain = Chain::open(&top, &ChainOptions::default()).unwrap();
    let out1 = dir.path().join("l1.raw");
    let r = flatten(&chain, &out1, opts(FlattenFormat::Raw).layer(1)).unwrap();
    assert_eq!(r.layers, 3);
    assert!(std::fs::read(&out1).unwrap() == compose(&models[1..]));
    assert!(
        flatten(
            &chain,
            dir.path().join("x.raw"),
            opts(FlattenFormat::Raw).layer(9)
        )
        .is_err()
    );
}

#[cfg(feature = "cli")]
#[test]
fn cli_flatten() {
    let dir = fast_tempdir();
    let (top, models) = random_chain(dir.path(), 1234, 3, false);
    let want = compose(&models);
    let exe = env!("CARGO_BIN_EXE_vhd-merge");
    let run = |args: &[&str], out: &Path| {
        std::process::Command::new(exe)
            .arg("flatten")
            .arg(&top)
            .arg(out)
            .args(args)
            .output()
            .unwrap()
    };
    let raw = dir.path().join("c.raw");
    let o = run(&["--format", "raw"], &raw);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&raw).unwrap() == want);
    let o = run(&["--format", "raw"], &raw);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("error 32773"));
    let o = run(&["--format", "raw", "--force"], &raw);
    assert!(o.status.success());
    let dynamic = dir.path().join("c.vhd");
    let o = run(&[], &dynamic);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("dynamic"));
    let v = Vhd::open(&dynamic, OpenOptions::read_only()).unwrap();
    assert_eq!(v.disk_type(), vhd_merge::DiskType::Dynamic);
    let fixed = dir.path().join("f.vhd");
    assert!(run(&["--format", "fixed"], &fixed).status.success());
    assert_eq!(
        Vhd::open(&fixed, OpenOptions::read_only())
            .unwrap()
            .disk_type(),
        vhd_merge::DiskType::Fixed
    );
}

/// Flatten's progress counts the data to copy: the spans some layer has a block in, not the
/// virtual size.
#[test]
fn progress_counts_the_data_to_copy() {
    let dir = fast_tempdir();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    let small = CreateOptions::default().block_size(512 * 1024);
    let mut b = create_dynamic(&base, 64 << 20, &small).unwrap();
    b.write_at(0, &[1; 4096]).unwrap();
    drop(b);
    let mut c = vhd_merge::create::create_differencing(&child, &base, &small).unwrap();
    c.write_at(40 << 20, &[2; 4096]).unwrap();
    c.write_at((40 << 20) + 8192, &[3; 512]).unwrap();
    drop(c);
    for (format, span) in [
        (FlattenFormat::Dynamic, 512 * 1024),
        (FlattenFormat::Raw, 2 << 20),
        (FlattenFormat::Fixed, 2 << 20),
    ] {
        let mut last = None;
        let mut cb = |p: &vhd_merge::FlattenProgress| last = Some(*p);
        let out = dir.path().join(format!("out-{}", format.name()));
        flatten_path(
            &child,
            &ChainOptions::default(),
            &out,
            FlattenOptions::default()
                .format(format)
                .progress(Some(&mut cb))
                .block_size(Some(512 * 1024)),
        )
        .unwrap();
        let p = last.unwrap();
        assert_eq!(p.position, 64 << 20, "{format:?}");
        assert_eq!(
            (p.data_done, p.data_total),
            (2 * span, 2 * span),
            "{format:?}"
        );
    }
}

/// Flatten `chain_top` into `out` as `format` (the default block size unless `block_size`).
fn convert(chain_top: &Path, out: &Path, format: FlattenFormat, block_size: Option<u32>) {
    let chain = Chain::open(chain_top, &ChainOptions::default()).unwrap();
    let opts = FlattenOptions::default()
        .format(format)
        .block_size(block_size);
    flatten(&chain, out, opts).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
}

/// What qemu-img reads of a fixed or dynamic VHD or VHDX, `None` without qemu-img.
fn qemu_reads(path: &Path, vhdx: bool) -> Option<Vec<u8>> {
    if vhdx {
        let check = oracles::qemu_img_check_vhdx(path)?;
        assert!(
            check.is_ok(),
            "qemu-img check {}: {check:?}",
            path.display()
        );
        oracles::qemu_img_raw_vhdx(path)
    } else {
        oracles::qemu_img_raw(path)
    }
}

/// Convert-VHD both ways: a VHD chain (a partial last block, data in both layers) becomes a
/// dynamic and a fixed VHDX, and those become a dynamic and a fixed VHD again, each reading
/// the chain's view in our reader and in qemu-img; a 4096-byte-sector VHDX becomes a VHD
/// (512-byte sectors, same bytes); a VHDX output with 256 MiB blocks is written in parts.
#[test]
fn conversion_between_vhd_and_vhdx_keeps_every_sector() {
    use vhd_merge::vhdx::create as vx;
    let dir = fast_tempdir();
    let mut rng = Rng::new(77);
    let (base, child) = (dir.path().join("base.vhd"), dir.path().join("child.vhd"));
    let size = 9 * MIB + 64 * KIB;
    let mut b = create_dynamic(&base, size, &CreateOptions::default()).unwrap();
    let mut data = vec![0u8; 3 * MIB as usize];
    rng.fill(&mut data);
    b.write_at(MIB, &data).unwrap();
    b.write_at(size - 8192, &data[..8192]).unwrap();
    drop(b);
    let mut c =
        vhd_merge::create::create_differencing(&child, &base, &CreateOptions::default()).unwrap();
    c.write_at(2 * MIB + 1536, &data[..5120]).unwrap();
    c.write_at(6 * MIB, &data[..MIB as usize]).unwrap();
    drop(c);
    let want = common::read_view(&child);

    let cases = [
        ("d.vhdx", FlattenFormat::VhdxDynamic, true),
        ("f.vhdx", FlattenFormat::VhdxFixed, true),
    ];
    for (name, format, vhdx) in cases {
        let out = dir.path().join(name);
        convert(&child, &out, format, None);
        common::assert_same(&common::read_view(&out), &want, name);
        if let Some(q) = qemu_reads(&out, vhdx) {
            common::assert_same(&q, &want, &format!("qemu-img reading {name}"));
        }
        for (back, format) in [
            ("d.vhd", FlattenFormat::Dynamic),
            ("f.vhd", FlattenFormat::Fixed),
        ] {
            let again = dir.path().join(format!("{name}-{back}"));
            convert(&out, &again, format, None);
            common::assert_same(&common::read_view(&again), &want, back);
            if let Some(q) = qemu_reads(&again, false) {
                common::assert_same(&q, &want, &format!("qemu-img reading {back}"));
            }
        }
    }
    let big = dir.path().join("big-blocks.vhdx");
    convert(&child, &big, FlattenFormat::VhdxDynamic, Some(256 << 20));
    common::assert_same(&common::read_view(&big), &want, "256 MiB blocks");

    let s4k = dir.path().join("4k.vhdx");
    let opts = vx::CreateOptions::default().logical_sector_size(4096);
    let mut v = vx::create_dynamic(&s4k, 8 * MIB, &opts).unwrap();
    v.write_at(4096 * 3, &data[..3 * 4096]).unwrap();
    v.finish().unwrap();
    drop(v);
    let want4k = common::read_view(&s4k);
    let as_vhd = dir.path().join("4k.vhd");
    convert(&s4k, &as_vhd, FlattenFormat::Dynamic, None);
    common::assert_same(
        &common::read_view(&as_vhd),
        &want4k,
        "4096-byte sectors to VHD",
    );
}

/// A VHDX larger than 2040 GiB cannot become a VHD: refused before anything is written (no
/// output, no temporary file), while a VHDX output is fine.
#[test]
fn a_vhdx_past_2040_gib_is_not_converted_to_vhd() {
    let dir = fast_tempdir();
    let src = dir.path().join("huge.vhdx");
    let opts = vhd_merge::vhdx::create::CreateOptions::default();
    vhd_merge::vhdx::create::create_dynamic(&src, 2041 << 30, &opts).unwrap();
    let chain = Chain::open(&src, &ChainOptions::default()).unwrap();
    for format in [FlattenFormat::Dynamic, FlattenFormat::Fixed] {
        let out = dir.path().join("out.vhd");
        let opts = FlattenOptions::default().format(format);
        let e = flatten(&chain, &out, opts).unwrap_err();
        assert_eq!(e.return_code(), ReturnCode::InvalidParameter, "{e}");
        assert!(
            e.to_string().contains("2040") || e.to_string().contains("larger"),
            "{e}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the source is there");
    }
}
