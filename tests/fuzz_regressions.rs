//! Replays every input a fuzz target crashed on (tests/data/fuzz/<target>/) with the checks
//! the target makes, plus hand-made inputs of the same kinds. A crash here is a regression.

mod reliability_util;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use reliability_util::*;
use vhd_merge::check::{CheckOptions, check_storage};
use vhd_merge::io::{MemStorage, Storage};
use vhd_merge::repair::{RepairOptions, repair_storage};
use vhd_merge::{Chain, ChainOptions, OpenOptions, Vhd};

const LIMIT: u64 = 4 << 20;

#[derive(Clone, Debug)]
struct Shared(Arc<MemStorage>);

impl Storage for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}

fn mem(data: &[u8]) -> Box<MemStorage> {
    Box::new(MemStorage::with_limit(data.to_vec(), LIMIT))
}

/// What the `open` target does with an input.
fn open_target(data: &[u8]) {
    for lenient in [false, true] {
        let o = OpenOptions {
            lenient,
            ..OpenOptions::read_only()
        };
        if let Ok(v) = Vhd::from_storage(mem(data), "fuzz.vhd", o) {
            let mut buf = vec![0u8; v.block_size().min(1 << 20) as usize];
            let n = v.virtual_size().min(buf.len() as u64) as usize;
            let _ = v.read_own(0, &mut buf[..n]);
            for i in 0..v.bat().entries.len().min(64) as u64 {
                let _ = v.block_map(i);
            }
        }
    }
    let deep = CheckOptions {
        deep: true,
        ..CheckOptions::default()
    };
    let _ = check_storage(mem(data), "fuzz.vhd", &deep);
    let shared = Shared(Arc::new(MemStorage::with_limit(data.to_vec(), LIMIT)));
    if let Ok(r) = repair_storage(
        Box::new(shared.clone()),
        "fuzz.vhd",
        &RepairOptions::default(),
    ) {
        let after = shared.0.to_vec();
        if r.is_clean() {
            assert_eq!(after, data, "a repair with nothing to do wrote");
        }
        let again = repair_storage(mem(&after), "fuzz.vhd", &RepairOptions::default())
            .expect("a repaired file is repairable");
        assert!(again.is_clean(), "repair is not idempotent: {again:?}");
        Vhd::from_storage(mem(&after), "fuzz.vhd", OpenOptions::read_only())
            .expect("a repaired file opens strictly");
    }
}

/// What the `chain` target does: the input as a child next to a valid parent.
fn chain_target(dir: &Path, data: &[u8]) {
    let c = dir.join("child.vhd");
    std::fs::write(&c, data).unwrap();
    let confined = ChainOptions {
        ignore_absolute_locators: true,
        confine_to: Some(vec![dir.to_path_buf()]),
        ..ChainOptions::default()
    };
    for o in [ChainOptions::default(), confined] {
        if let Ok(chain) = Chain::open(&c, &o) {
            let mut buf = vec![0u8; 64 << 10];
            for i in 0..chain.len() {
                let n = chain.vhd(i).virtual_size().min(buf.len() as u64) as usize;
                let _ = chain.read_at(i, 0, &mut buf[..n]);
            }
        }
    }
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz")
        .join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

#[test]
fn open_crashers() {
    for p in inputs("open") {
        eprintln!("replaying {}", p.display());
        open_target(&std::fs::read(&p).unwrap());
    }
}

#[test]
fn chain_crashers() {
    let d = tempfile::tempdir().unwrap();
    dynamic(d.path(), "parent.vhd");
    for p in inputs("chain") {
        eprintln!("replaying {}", p.display());
        chain_target(d.path(), &std::fs::read(&p).unwrap());
    }
}

/// The `open` target's properties on damaged files of every kind the catalogue makes, with
/// every single byte of the metadata flipped in turn.
#[test]
fn open_target_properties_on_damaged_files() {
    let d = tempfile::tempdir().unwrap();
    let base = dynamic(d.path(), "d.vhd");
    let c = child(d.path(), "c.vhd", &base);
    let f = fixed(d.path(), "f.vhd");
    for p in [&base, &c, &f] {
        let good = read(p);
        open_target(&good);
        let len = good.len();
        // Footer copy, header, BAT, locator area, end footer.
        let spots = (0..2048).chain(len.saturating_sub(512)..len);
        for i in spots.step_by(3) {
            if i >= len {
                continue;
            }
            let mut bad = good.clone();
            bad[i] ^= 0xA5;
            open_target(&bad);
        }
        for cut in [0, 100, 511, 512, 1023, 1536, 2048, len / 2, len - 1] {
            open_target(&good[..cut.min(len)]);
        }
    }
}

/// Three fuzz crashers (derived from a GPL fixture, so rebuilt here from a generated file): the
/// BAT's entries end before the end footer but its sector padding runs into it. BAT updates
/// write whole sectors, so the first one would have destroyed the footer; a repaired file did
/// not open. Validation now stops there.
#[test]
fn padded_bat_running_into_the_end_footer() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.vhd");
    let o = vhd_merge::create::CreateOptions {
        block_size: 4096,
        ..opts()
    };
    drop(vhd_merge::create::create_dynamic(&p, 64 << 10, &o).unwrap());
    let good = read(&p);
    let h = header(&p);
    assert_eq!(h.max_table_entries, 16);
    // Footer right after the 64 bytes of entries, inside the BAT's padding.
    let at = (h.table_offset + 64 + 8) as usize;
    let mut bad = good[..at].to_vec();
    bad.extend_from_slice(&good[..512]);
    open_target(&bad);
    let insp = Vhd::inspect_storage(mem(&bad), "x.vhd", OpenOptions::read_only());
    assert!(insp.vhd.is_none());
    let last = insp.problems.last().unwrap();
    assert_eq!(last.code, "bat-placement");
    assert!(
        last.message.contains("overlaps the end footer"),
        "{}",
        last.message
    );
}
