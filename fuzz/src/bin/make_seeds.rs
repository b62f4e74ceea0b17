//! Build the seed corpora: `make-seeds OUT_DIR [FIXTURE_FILE...]`.
//!
//! Generates small files of every type with this crate (the chain seeds point at the parent
//! the chain target creates), and adds the given fixture files whole (open, chain) and their
//! footers and headers (footer, header). See `fuzz/seed.sh`.

use std::fs;
use std::path::{Path, PathBuf};

use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};

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
