//! The oracles: tools nobody here wrote (qemu-img, qemu-io, libvhdi through Python), and the
//! one rule for when they are missing.
//!
//! A test that needs one asks [`require_tool`] or [`pyvhdi_available`], or calls a runner
//! here, which asks first and returns `None` when the tool is missing. Missing means: print a
//! note and skip, unless `VHD_MERGE_REQUIRE_ORACLES=1` is set (CI sets it); then it is a
//! failure.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use super::note;

/// The environment variable that turns a missing oracle into a failure.
pub const REQUIRE_ORACLES: &str = "VHD_MERGE_REQUIRE_ORACLES";

/// True when `VHD_MERGE_REQUIRE_ORACLES=1`.
pub fn oracles_required() -> bool {
    std::env::var(REQUIRE_ORACLES).is_ok_and(|v| v == "1")
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
        Ok(o) => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            let why = match stderr.trim() {
                "" => format!(
                    "`{} -c \"import pyvhdi\"` exited with {}",
                    python(),
                    o.status
                ),
                text => text.to_string(),
            };
            missing("libvhdi (python module pyvhdi)", &why)
        }
        Err(e) => missing("libvhdi (python module pyvhdi)", &e.to_string()),
    }
}

/// Run qemu-img with the arguments `args` adds. `None` when qemu-img is missing (skip); else
/// its output, whatever its exit status.
pub fn qemu_img(args: impl FnOnce(&mut Command) -> &mut Command) -> Option<Output> {
    if !require_tool("qemu-img") {
        return None;
    }
    Some(
        args(&mut Command::new("qemu-img"))
            .output()
            .expect("run qemu-img"),
    )
}

/// qemu-img's message when it failed, as `Err`.
fn qemu_img_result(out: &Output) -> Result<(), String> {
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// `qemu-img convert -f vpc -O raw SRC DEST`. `None` when qemu-img is missing (skip); `Err`
/// with qemu-img's message when it refuses the file.
pub fn qemu_img_convert(src: &Path, dest: &Path) -> Option<Result<(), String>> {
    qemu_img_convert_from("vpc", src, dest)
}

/// `qemu-img convert -f FORMAT -O raw SRC DEST`, as [`qemu_img_convert`].
pub fn qemu_img_convert_from(format: &str, src: &Path, dest: &Path) -> Option<Result<(), String>> {
    let out = qemu_img(|c| {
        c.args(["convert", "-f", format, "-O", "raw"])
            .arg(src)
            .arg(dest)
    })?;
    Some(qemu_img_result(&out))
}

/// The whole VHDX disk as qemu-img reads it (`qemu-img convert -f vhdx -O raw`). `None` when
/// qemu-img is missing; panics when qemu-img fails on the file.
pub fn qemu_img_raw_vhdx(path: &Path) -> Option<Vec<u8>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("out.raw");
    match qemu_img_convert_from("vhdx", path, &raw)? {
        Ok(()) => Some(std::fs::read(&raw).expect("read qemu-img output")),
        Err(e) => panic!("qemu-img convert -f vhdx {} failed: {e}", path.display()),
    }
}

/// `qemu-img check -f vhdx FILE` (read-only: no repair). `None` when qemu-img is missing; `Err`
/// with its output unless it says "No errors were found".
pub fn qemu_img_check_vhdx(path: &Path) -> Option<Result<(), String>> {
    let out = qemu_img(|c| c.args(["check", "-f", "vhdx"]).arg(path))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Some(
        if out.status.success() && stdout.contains("No errors were found") {
            Ok(())
        } else {
            Err(format!(
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        },
    )
}

/// `qemu-img check -r all -f vhdx FILE`: qemu's repair, which replays a dirty log (the only
/// way qemu reads one). `None` when qemu-img is missing; `Err` with its output when it fails.
pub fn qemu_img_repair_vhdx(path: &Path) -> Option<Result<(), String>> {
    let out = qemu_img(|c| c.args(["check", "-r", "all", "-f", "vhdx"]).arg(path))?;
    Some(qemu_img_result(&out))
}

/// `qemu-img create -q -f vhdx -o OPTIONS FILE SIZE`, panicking when it fails. `None` when
/// qemu-img is missing.
pub fn qemu_img_create_vhdx(path: &Path, options: &str, size: &str) -> Option<()> {
    qemu_img_create_as("vhdx", path, options, size)
}

/// `qemu-img create -q -f FORMAT -o OPTIONS FILE SIZE`, panicking when it fails (one runner
/// for every format, as `qemu_img_convert_from` and `qemu_io_fmt` are).
fn qemu_img_create_as(format: &str, path: &Path, options: &str, size: &str) -> Option<()> {
    let out = qemu_img(|c| {
        c.args(["create", "-q", "-f", format, "-o"])
            .arg(options)
            .arg(path)
            .arg(size)
    })?;
    if let Err(e) = qemu_img_result(&out) {
        panic!("qemu-img create {} ({options}) failed: {e}", path.display());
    }
    Some(())
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

/// `qemu-img SUBCOMMAND -f vpc --output=json FILE` (`info` or `map`), parsed. `None` when
/// qemu-img is missing; `Err` with qemu-img's message when it refuses the file.
fn qemu_img_json(subcommand: &str, path: &Path) -> Option<Result<serde_json::Value, String>> {
    let out = qemu_img(|c| {
        c.arg(subcommand)
            .args(["-f", "vpc", "--output=json"])
            .arg(path)
    })?;
    Some(
        qemu_img_result(&out).map(|()| serde_json::from_slice(&out.stdout).expect("qemu-img JSON")),
    )
}

/// `qemu-img info -f vpc --output=json`'s `virtual-size`. `None` when qemu-img is missing.
pub fn qemu_img_virtual_size(path: &Path) -> Option<Result<u64, String>> {
    Some(qemu_img_json("info", path)?.map(|v| v["virtual-size"].as_u64().expect("virtual-size")))
}

/// True when `qemu-img map -f vpc` reports no extent holding data. `None` when qemu-img is
/// missing; panics when qemu-img fails on the file.
pub fn qemu_img_map_has_no_data(path: &Path) -> Option<bool> {
    let map = qemu_img_json("map", path)?
        .unwrap_or_else(|e| panic!("qemu-img map {} failed: {e}", path.display()));
    Some(
        map.as_array()
            .expect("qemu-img map gives an array")
            .iter()
            .all(|e| e["data"] == serde_json::Value::Bool(false)),
    )
}

/// `qemu-img create -q -f vpc -o OPTIONS FILE SIZE`, panicking when it fails. `None` when
/// qemu-img is missing.
pub fn qemu_img_create(path: &Path, options: &str, size: &str) -> Option<()> {
    qemu_img_create_as("vpc", path, options, size)
}

/// Run `qemu-io -f vpc -c CMD ... FILE`, panicking when it fails. `None` when qemu-io is missing.
pub fn qemu_io(path: &Path, commands: &[String]) -> Option<()> {
    qemu_io_fmt("vpc", path, commands)
}

/// Run `qemu-io -f FORMAT -c CMD ... FILE`, as [`qemu_io`].
pub fn qemu_io_fmt(format: &str, path: &Path, commands: &[String]) -> Option<()> {
    if !require_tool("qemu-io") {
        return None;
    }
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
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

/// Run the Python `script` (which imports pyvhdi) with `args`; its standard output. `None` when
/// libvhdi is missing; panics when the script fails.
pub fn libvhdi_python(script: &str, args: &[&Path]) -> Option<Vec<u8>> {
    if !pyvhdi_available() {
        return None;
    }
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "libvhdi failed on {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out.stdout)
}

/// The whole media of the chain `paths` (child first, each file's parent next) as libvhdi
/// reads it. `None` when libvhdi is missing; panics when it fails. libvhdi misreads partly set
/// bitmap bytes and block sizes other than 2 MiB: use 2 MiB blocks and 4 KiB-aligned writes.
pub fn libvhdi_read_chain(paths: &[&Path]) -> Option<Vec<u8>> {
    libvhdi_python(LIBVHDI_READ, paths)
}
