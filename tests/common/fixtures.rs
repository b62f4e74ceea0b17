//! Real fixture files: `fixtures/` in the repository (permissive licences) and
//! `../shared/fixtures/real` next to the checkout (all of them, GPL/AGPL ones included),
//! decompressed once into a cache under `target/`.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::note;

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
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/real");
    fixture_from(
        rel,
        [(repo_fixtures(), Origin::Repo), (shared, Origin::Shared)],
    )
}

/// The VHDX fixture `rel` (e.g. `dfvfs/ntfs-fixed.vhdx`), as [`fixture`] does for VHD: from
/// `fixtures/vhdx/` (MIT and Apache files) else `../shared/fixtures/real-vhdx` (qemu's GPL ones).
pub fn vhdx_fixture(rel: &str) -> Option<(PathBuf, Origin)> {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/real-vhdx");
    let roots = [
        (repo_fixtures().join("vhdx"), Origin::Repo),
        (shared, Origin::Shared),
    ];
    fixture_from(rel, roots)
}

fn fixture_from(rel: &str, roots: [(PathBuf, Origin); 2]) -> Option<(PathBuf, Origin)> {
    // One decompression at a time: tests run as threads of one process and share the cache.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let shared = roots[1].0.clone();
    for (root, origin) in roots {
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
    if !shared.is_dir() {
        return shared_fixtures().and(None);
    }
    panic!(
        "fixture {rel} is in neither {} nor {}",
        repo_fixtures().display(),
        shared.display()
    );
}

/// A writable copy of the fixture `rel` (see [`fixture`]) in `dir`, under its own file name:
/// for tests that write to it or need it next to another file. `None` (with a note) when it is
/// only in the shared directory and that is absent.
pub fn fixture_copy(rel: &str, dir: &Path) -> Option<PathBuf> {
    let (src, _) = fixture(rel)?;
    let name = Path::new(rel).file_name().expect("fixture file name");
    let dest = dir.join(name);
    std::fs::copy(&src, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
    make_writable(&dest);
    Some(dest)
}

/// A writable copy in `dir` of the fixture file `src` (plain, `.gz` or `.bz2`), decompressed
/// and named without the compression extension: for tests that go through whole fixture
/// directories.
pub fn unpack_into(src: &Path, dir: &Path) -> PathBuf {
    let name = src
        .file_name()
        .expect("fixture file name")
        .to_string_lossy();
    match name
        .strip_suffix(".gz")
        .or_else(|| name.strip_suffix(".bz2"))
    {
        Some(stem) => {
            let dest = dir.join(stem);
            decompress(src, &dest);
            dest
        }
        None => {
            let dest = dir.join(&*name);
            std::fs::copy(src, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
            make_writable(&dest);
            dest
        }
    }
}

/// Fixture files may be read-only (the shared directory's are); copies are written to.
fn make_writable(p: &Path) {
    let mut perm = std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(p, perm).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
}
