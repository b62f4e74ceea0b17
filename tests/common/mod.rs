//! Helpers shared by the integration tests: the oracles (qemu-img, qemu-io, libvhdi), the
//! fixture files, decompression, a deterministic random generator and byte comparisons.
//!
//! Oracle rule: a test that needs a tool nobody here wrote asks [`require_tool`] (or
//! [`pyvhdi_available`]). When the tool is missing the test prints a note and skips, unless
//! `VHD_MERGE_REQUIRE_ORACLES=1` is set (CI sets it): then a missing oracle is a failure.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The environment variable that turns a missing oracle into a failure.
pub const REQUIRE_ORACLES: &str = "VHD_MERGE_REQUIRE_ORACLES";

/// True when `VHD_MERGE_REQUIRE_ORACLES=1`.
pub fn oracles_required() -> bool {
    std::env::var(REQUIRE_ORACLES).is_ok_and(|v| v == "1")
}

/// Print a note that `cargo test` shows even for passing tests (it captures only the print
/// macros, not direct writes to stderr).
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "note: {text}");
}

/// Report a missing oracle: panic when oracles are required, else print a note. Returns false.
fn missing(what: &str, why: &str) -> bool {
    assert!(
        !oracles_required(),
        "{what} is required ({REQUIRE_ORACLES}=1) but not usable: {why}"
    );
    note(&format!(
        "skipping: {what} is not available ({why}); set {REQUIRE_ORACLES}=1 to make this a failure"
    ));
    false
}

/// True when the command-line tool `name` runs (`name --version`). When it does not: panics if
/// oracles are required, else prints a note and returns false (the caller skips).
pub fn require_tool(name: &str) -> bool {
    match Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => true,
        Ok(s) => missing(name, &format!("`{name} --version` exited with {s}")),
        Err(e) => missing(name, &e.to_string()),
    }
}

/// The Python interpreter used for libvhdi: `$VHD_MERGE_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("VHD_MERGE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// True when Python can import libvhdi's binding `pyvhdi` (pip `libvhdi-python` or Debian
/// `python3-libvhdi`). Same rule as [`require_tool`].
pub fn pyvhdi_available() -> bool {
    match Command::new(python())
        .args(["-c", "import pyvhdi"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => true,
        Ok(o) => missing(
            "libvhdi (python module pyvhdi)",
            String::from_utf8_lossy(&o.stderr).trim(),
        ),
        Err(e) => missing("libvhdi (python module pyvhdi)", &e.to_string()),
    }
}

/// `qemu-img convert -f vpc -O raw SRC DEST`. `None` when qemu-img is missing (skip); `Err`
/// with qemu-img's message when it refuses the file.
pub fn qemu_img_convert(src: &Path, dest: &Path) -> Option<Result<(), String>> {
    if !require_tool("qemu-img") {
        return None;
    }
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(src)
        .arg(dest)
        .output()
        .expect("run qemu-img");
    if out.status.success() {
        Some(Ok(()))
    } else {
        Some(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// The whole disk as qemu-img reads it (`qemu-img convert -f vpc -O raw`). `None` when
/// qemu-img is missing; panics when qemu-img fails on the file. Never use it on a
/// differencing disk: qemu reads those as if they had no parent.
pub fn qemu_img_raw(path: &Path) -> Option<Vec<u8>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("out.raw");
    match qemu_img_convert(path, &raw)? {
        Ok(()) => Some(std::fs::read(&raw).expect("read qemu-img output")),
        Err(e) => panic!("qemu-img convert {} failed: {e}", path.display()),
    }
}

/// `qemu-img info -f vpc --output=json`'s `virtual-size`. `None` when qemu-img is missing.
pub fn qemu_img_virtual_size(path: &Path) -> Option<Result<u64, String>> {
    if !require_tool("qemu-img") {
        return None;
    }
    let out = Command::new("qemu-img")
        .args(["info", "-f", "vpc", "--output=json"])
        .arg(path)
        .output()
        .expect("run qemu-img");
    if !out.status.success() {
        return Some(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img JSON");
    Some(Ok(v["virtual-size"].as_u64().expect("virtual-size")))
}

/// Run `qemu-io -f vpc -c CMD ... FILE`, panicking when it fails. `None` when qemu-io is missing.
pub fn qemu_io(path: &Path, commands: &[String]) -> Option<()> {
    if !require_tool("qemu-io") {
        return None;
    }
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "vpc"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.arg(path).output().expect("run qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io on {} failed: {}{}",
        path.display(),
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// Python reading a chain with libvhdi: every file opened, each given the next as its parent,
/// the first one's whole media written to stdout.
const LIBVHDI_READ: &str = r#"
import sys, pyvhdi
files = []
for p in sys.argv[1:]:
    f = pyvhdi.file()
    f.open(p)
    files.append(f)
for i in reversed(range(len(files) - 1)):
    files[i].set_parent(files[i + 1])
f = files[0]
size = f.get_media_size()
out = sys.stdout.buffer
off = 0
while off < size:
    n = min(4 << 20, size - off)
    data = f.read_buffer_at_offset(n, off)
    if len(data) != n:
        sys.exit("short read at %d: %d of %d bytes" % (off, len(data), n))
    out.write(data)
    off += n
out.flush()
"#;

/// The whole media of the chain `paths` (child first, each file's parent next) as libvhdi
/// reads it. `None` when libvhdi is missing; panics when it fails. libvhdi misreads partly set
/// bitmap bytes and block sizes other than 2 MiB: use 2 MiB blocks and 4 KiB-aligned writes.
pub fn libvhdi_read_chain(paths: &[&Path]) -> Option<Vec<u8>> {
    if !pyvhdi_available() {
        return None;
    }
    let out = Command::new(python())
        .arg("-c")
        .arg(LIBVHDI_READ)
        .args(paths)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "libvhdi failed on {paths:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out.stdout)
}

/// The repository's `fixtures/` directory.
pub fn repo_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// `../shared/fixtures/real` next to the checkout (the GPL/AGPL files live only there), or
/// `None` with a note when it is absent.
pub fn shared_fixtures() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/real");
    static NOTED: std::sync::Once = std::sync::Once::new();
    if dir.is_dir() {
        Some(dir)
    } else {
        // Once per test binary: every GPL/AGPL fixture would repeat it.
        NOTED.call_once(|| {
            note(&format!(
                "skipping the GPL/AGPL fixtures: {} is absent (they are not part of the repository)",
                dir.display()
            ))
        });
        None
    }
}

/// A directory under `target/` that survives between runs, for decompressed fixtures.
pub fn cache_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&d).expect("create fixture cache");
    d
}

/// Decompress `src` (`.gz` or `.bz2`) into `dest`, written under a temporary name and renamed,
/// so that tests running in parallel never see half a file.
pub fn decompress(src: &Path, dest: &Path) {
    let input = File::open(src).unwrap_or_else(|e| panic!("open {}: {e}", src.display()));
    let mut reader: Box<dyn Read> = match src.extension().and_then(|e| e.to_str()) {
        Some("gz") => Box::new(flate2::read::GzDecoder::new(input)),
        Some("bz2") => Box::new(bzip2::read::MultiBzDecoder::new(input)),
        _ => panic!("{} is not .gz or .bz2", src.display()),
    };
    let tmp = dest.with_extension(format!("partial{}", std::process::id()));
    let mut out = File::create(&tmp).expect("create decompressed file");
    std::io::copy(&mut reader, &mut out)
        .unwrap_or_else(|e| panic!("decompress {}: {e}", src.display()));
    out.flush().expect("flush");
    drop(out);
    std::fs::rename(&tmp, dest).expect("rename decompressed file");
}

/// Where a fixture comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `fixtures/` in the repository.
    Repo,
    /// `../shared/fixtures/real`.
    Shared,
}

/// The fixture `rel` (its decompressed name, e.g. `node-vhd/dynamic.vhd`) as a plain file:
/// from `fixtures/` when the repository has it, else from `../shared/fixtures/real`;
/// compressed ones are decompressed once into [`cache_dir`]. `None` (with a note) when the
/// file is only in the shared directory and that is absent.
pub fn fixture(rel: &str) -> Option<(PathBuf, Origin)> {
    // One decompression at a time: tests run as threads of one process and share the cache.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/real");
    for (root, origin) in [(repo_fixtures(), Origin::Repo), (shared, Origin::Shared)] {
        let plain = root.join(rel);
        if plain.is_file() {
            return Some((plain, origin));
        }
        for ext in ["gz", "bz2"] {
            let packed = root.join(format!("{rel}.{ext}"));
            if !packed.is_file() {
                continue;
            }
            let dest = cache_dir().join(rel.replace('/', "__"));
            let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let fresh =
                matches!((modified(&dest), modified(&packed)), (Some(d), Some(p)) if d >= p);
            if !fresh {
                decompress(&packed, &dest);
            }
            return Some((dest, origin));
        }
    }
    shared_fixtures()?;
    panic!("fixture {rel} is in neither fixtures/ nor ../shared/fixtures/real");
}

/// The built `vhd-merge` binary, when Cargo built it (the `cli` feature).
pub fn binary() -> Option<PathBuf> {
    match option_env!("CARGO_BIN_EXE_vhd-merge") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            note("skipping: the vhd-merge binary is not built (feature `cli` off)");
            None
        }
    }
}

/// A small deterministic generator (SplitMix64) for test data and write patterns.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Assert two byte strings are equal, naming the first differing 512-byte sector instead of
/// printing megabytes.
pub fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: lengths differ ({} vs {})",
        actual.len(),
        expected.len()
    );
    if actual == expected {
        return;
    }
    let i = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let s = i / 512;
    panic!(
        "{what}: first difference at byte {i} (sector {s}): got {:02x?}, expected {:02x?}",
        &actual[s * 512..(s * 512 + 16).min(actual.len())],
        &expected[s * 512..(s * 512 + 16).min(expected.len())]
    );
}

/// Read a whole file.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
