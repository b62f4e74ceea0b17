//! Interrupts of the `vhd-merge` binary: SIGTERM and SIGHUP stop a merge or a flatten like
//! Ctrl-C (between units, committed, exit status 130, no temporary file left), and a second
//! signal ends the process at once without damaging any file.
//!
//! To catch the command mid-work every time, the test stops it (SIGSTOP) as soon as it is
//! seen working, queues the signals, and lets it go on (SIGCONT): the signals then arrive
//! while there is still most of the work to do.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic};

/// A chain with `mib` MiB of data in the child (2 MiB blocks, every other one written).
fn chain(dir: &Path, mib: u64) -> (PathBuf, PathBuf) {
    let base = dir.join("base.vhd");
    let child = dir.join("child.vhd");
    let opts = CreateOptions::default();
    drop(create_dynamic(&base, 4 << 30, &opts).unwrap());
    let mut c = create_differencing(&child, &base, &opts).unwrap();
    let chunk = vec![7u8; 2 << 20];
    for i in 0..mib / 2 {
        c.write_at(i * (4 << 20), &chunk).unwrap();
    }
    drop(c);
    (base, child)
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig}");
}

/// Whether the process has a handler for SIGTERM (bit 15 of SigCgt in /proc).
fn handles_sigterm(child: &Child) -> bool {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .is_some_and(|m| m & (1 << 14) != 0)
}

/// Start `args`, wait until it handles SIGTERM and `working` says it is working, stop it,
/// send `sigs`, let it go on; its output.
fn interrupt(args: &[&Path], working: impl Fn() -> bool, sigs: &[&str]) -> std::process::Output {
    let bin = common::binary().unwrap();
    let child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !(handles_sigterm(&child) && working()) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never started working"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    signal(&child, "-STOP");
    for s in sigs {
        signal(&child, s);
    }
    signal(&child, "-CONT");
    child.wait_with_output().unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// Re-run the merge: it finishes, and the base then reads what the child read.
fn merge_again_finishes(base: &Path, child: &Path, view: &[u8]) {
    let bin = common::binary().unwrap();
    let out = Command::new(bin).arg("merge").arg(child).output().unwrap();
    assert!(out.status.success(), "re-run: {}", stderr(&out));
    common::assert_same(&common::read_view(base), view, "base after the re-run");
}

#[cfg_attr(
    not(target_os = "linux"),
    ignore = "sends POSIX signals (kill -STOP/-TERM/-HUP) and reads /proc"
)]
#[test]
fn sigterm_cancels_a_merge_between_units() {
    if common::binary().is_none() {
        return;
    }
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = chain(dir.path(), 256);
    let view = common::read_view(&child);
    let len0 = std::fs::metadata(&base).unwrap().len();
    let grown = || std::fs::metadata(&base).is_ok_and(|m| m.len() > len0);
    let out = interrupt(&[Path::new("merge"), &child], grown, &["-TERM"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.starts_with("error 32768 (Failed): cancelled: merge into"),
        "{err}"
    );
    assert!(err.contains("stopped after"), "{err}");
    // The destination is a valid VHD (a deep check finds no error) and a re-run finishes.
    assert!(common::deep_check_errors(&base).is_empty());
    merge_again_finishes(&base, &child, &view);
}

#[cfg_attr(
    not(target_os = "linux"),
    ignore = "sends POSIX signals (kill -STOP/-TERM/-HUP) and reads /proc"
)]
#[test]
fn sighup_cancels_a_flatten_and_removes_its_temporary_file() {
    if common::binary().is_none() {
        return;
    }
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let (_, child) = chain(dir.path(), 256);
    let flat = dir.path().join("flat.vhd");
    let d = dir.path().to_path_buf();
    let working = || !temp_files(&d).is_empty();
    let out = interrupt(&[Path::new("flatten"), &child, &flat], working, &["-HUP"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("cancelled: flatten stopped at byte"), "{err}");
    assert_eq!(
        temp_files(dir.path()),
        Vec::<String>::new(),
        "temporary file left"
    );
    assert!(!flat.exists(), "no output for a cancelled flatten");
    // Re-running writes the complete file.
    let bin = common::binary().unwrap();
    let out = Command::new(bin)
        .arg("flatten")
        .arg(&child)
        .arg(&flat)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    common::assert_same(
        &common::read_view(&flat),
        &common::read_view(&child),
        "flattened",
    );
}

/// Two signals: the second ends the process at once (exit status 130); the files are what a
/// crash leaves (valid, by the crash-safe write order), and re-running finishes the job.
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "sends POSIX signals (kill -STOP/-TERM/-HUP) and reads /proc"
)]
#[test]
fn a_second_signal_exits_at_once_without_damage() {
    if common::binary().is_none() {
        return;
    }
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = chain(dir.path(), 256);
    let view = common::read_view(&child);
    let len0 = std::fs::metadata(&base).unwrap().len();
    let grown = || std::fs::metadata(&base).is_ok_and(|m| m.len() > len0);
    // Two different signals: both stay pending while the process is stopped.
    let out = interrupt(&[Path::new("merge"), &child], grown, &["-TERM", "-HUP"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(common::deep_check_errors(&base).is_empty());
    merge_again_finishes(&base, &child, &view);

    let flat = dir.path().join("flat.vhd");
    let d = dir.path().to_path_buf();
    let working = || !temp_files(&d).is_empty();
    let out = interrupt(
        &[Path::new("flatten"), &base, &flat],
        working,
        &["-TERM", "-HUP"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert_eq!(
        temp_files(dir.path()),
        Vec::<String>::new(),
        "temporary file left: {err}"
    );
    assert!(!flat.exists());
}

/// repair has no unit to stop at: SIGTERM ends it at once with 130 and a message, and the
/// file is still one a re-run repairs.
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "sends POSIX signals (kill -STOP/-TERM/-HUP) and reads /proc"
)]
#[test]
fn sigterm_ends_a_repair_with_a_message() {
    if common::binary().is_none() {
        return;
    }
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = chain(dir.path(), 256);
    drop(base);
    let out = interrupt(&[Path::new("repair"), &child], || true, &["-TERM"]);
    let err = stderr(&out);
    match out.status.code() {
        Some(130) => assert!(err.contains("interrupted: repair stopped"), "{err}"),
        Some(0) => common::note("repair finished before SIGTERM arrived"),
        other => panic!("exit {other:?}: {err}"),
    }
    let bin = common::binary().unwrap();
    let out = Command::new(bin)
        .arg("repair")
        .arg(&child)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}
