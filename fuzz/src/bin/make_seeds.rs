//! Build the seed corpora: `make-seeds OUT_DIR [FIXTURE_FILE...]`.
//!
//! Generates small files of every type with this crate (the chain seeds point at the parent
//! the chain target creates), and adds the given fixture files whole (open, chain) and their
//! footers and headers (footer, header). See `fuzz/seed.sh`.

use std::fs;
use std::path::{Path, PathBuf};

use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
use vhd_merge::format::{Footer, SectorBitmap};

fn put(out: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = out.join(target);
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

fn add_file(out: &Path, name: &str, bytes: &[u8]) {
    if bytes.len() <= 256 << 10 {
        put(out, "open", name, bytes);
        put(out, "chain", name, bytes);
    }
    if bytes.len() >= 512 {
        put(out, "footer", name, &bytes[bytes.len() - 512..]);
        put(out, "footer", &format!("{name}.copy"), &bytes[..512]);
        let off = u64::from_be_bytes(bytes[16..24].try_into().unwrap_or_default());
        if let Ok(off) = usize::try_from(off)
            && let Some(h) = bytes.get(off..off.saturating_add(1024))
        {
            put(out, "header", name, h);
        }
    }
}

fn main() {
    let mut args = std::env::args_os().skip(1);
    let out = PathBuf::from(args.next().expect("usage: make-seeds OUT_DIR [FIXTURE...]"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let small = CreateOptions {
        block_size: 4096,
        timestamp: Some(7),
        ..CreateOptions::default()
    };

    let p = t.join("dyn.vhd");
    let mut v = create_dynamic(&p, 64 << 10, &small).expect("dynamic");
    v.write_at(0, &[0xA5; 4096]).expect("w");
    v.write_at(9 << 10, &[0x5A; 512]).expect("w");
    v.write_at(40 << 10, &[0x77; 1536]).expect("w");
    drop(v);
    add_file(&out, "gen-dynamic.vhd", &fs::read(&p).expect("read"));

    let p = t.join("empty.vhd");
    drop(create_dynamic(&p, 32 << 10, &small).expect("dynamic"));
    add_file(&out, "gen-empty.vhd", &fs::read(&p).expect("read"));

    let p = t.join("fixed.vhd");
    let mut v = create_fixed(&p, 8 << 10, &small).expect("fixed");
    v.write_at(512, &[0x42; 1024]).expect("w");
    drop(v);
    add_file(&out, "gen-fixed.vhd", &fs::read(&p).expect("read"));

    let parent = t.join("parent.vhd");
    vhd_merge_fuzz::write_parent(&parent);
    let child = t.join("child.vhd");
    let mut c = create_differencing(&child, &parent, &small).expect("diff");
    c.write_at(1024, &[0x33; 512]).expect("w");
    c.write_at(24 << 10, &[0x44; 4096]).expect("w");
    drop(c);
    add_file(&out, "gen-child.vhd", &fs::read(&child).expect("read"));
    let c = create_differencing(t.join("child2.vhd"), &parent, &small).expect("diff");
    drop(c);
    add_file(
        &out,
        "gen-child-empty.vhd",
        &fs::read(t.join("child2.vhd")).expect("read"),
    );

    merge_seeds(&out, t, &parent);

    for f in args {
        let f = PathBuf::from(f);
        let Ok(bytes) = fs::read(&f) else { continue };
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "fixture".into());
        add_file(&out, &format!("fx-{name}"), &bytes);
    }
}

/// Seeds of the `merge` target: children of the target's parent with every block size
/// relation (smaller, equal, larger than the parent's 4 KiB, larger than the disk), partial
/// and every-other-sector bitmaps, zero data under set bits, an empty child, a child smaller
/// than its parent, and a dynamic disk (which must be refused).
fn merge_seeds(out: &Path, t: &Path, parent: &Path) {
    let mut n = 0;
    let mut child = |bs: u32, f: &dyn Fn(&mut vhd_merge::Vhd)| {
        n += 1;
        let p = t.join(format!("m{n}.vhd"));
        let o = CreateOptions {
            block_size: bs,
            timestamp: Some(7),
            ..CreateOptions::default()
        };
        let mut c = create_differencing(&p, parent, &o).expect("diff");
        f(&mut c);
        c.finish().expect("finish");
        drop(c);
        let bytes = fs::read(&p).expect("read");
        put(out, "merge", &format!("gen-child-{bs}-{n}.vhd"), &bytes);
        p
    };
    child(4096, &|c| {
        c.write_at(1024, &[0x33; 512]).expect("w");
        c.write_at(24 << 10, &[0x44; 4096]).expect("w");
    });
    child(512, &|c| {
        c.write_at(0, &[0x01; 512]).expect("w");
        c.write_at(5 << 9, &[0x02; 1536]).expect("w");
        c.write_at(63 << 10, &[0x03; 1024]).expect("w");
    });
    child(64 << 10, &|c| {
        // Every other sector of the only block, some of them zero.
        let spb = (64 << 10) / 512;
        let mut mask = SectorBitmap::new(spb);
        for s in (0..spb).step_by(2) {
            mask.set(s);
        }
        let mut buf = vec![0x5Au8; 64 << 10];
        buf[..4096].fill(0);
        c.write_block(0, &mut buf, &mask).expect("w");
    });
    child(2 << 20, &|c| {
        c.write_at(8 << 10, &[0x77; 8192]).expect("w");
    });
    child(4096, &|_| {});
    child(8192, &|c| {
        // Zero data under set bits must overwrite the parent's 0x11.
        c.write_at(0, &[0; 2048]).expect("w");
        c.write_at(20 << 10, &[0; 512]).expect("w");
    });
    // A child that says it is 32 KiB (both footer copies).
    let small = child(4096, &|c| c.write_at(16 << 10, &[0x66; 4096]).expect("w"));
    let mut bytes = fs::read(&small).expect("read");
    let len = bytes.len();
    if let Ok(mut f) = Footer::parse(bytes[len - 512..].try_into().expect("512")) {
        f.current_size = 32 << 10;
        f.original_size = 32 << 10;
        let fb = f.to_bytes();
        bytes[len - 512..].copy_from_slice(&fb);
        bytes[..512].copy_from_slice(&fb);
        put(out, "merge", "gen-child-smaller.vhd", &bytes);
    }
    let p = t.join("mdyn.vhd");
    let mut v = create_dynamic(
        &p,
        64 << 10,
        &CreateOptions {
            block_size: 4096,
            timestamp: Some(7),
            ..CreateOptions::default()
        },
    )
    .expect("dynamic");
    v.write_at(0, &[9; 512]).expect("w");
    drop(v);
    put(
        out,
        "merge",
        "gen-dynamic.vhd",
        &fs::read(&p).expect("read"),
    );
}
