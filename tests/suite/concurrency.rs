//! Concurrency (issue 6, item 6): two merges into one destination, from two threads and from
//! two processes: exactly one proceeds, the other gets System is in use (32774) and writes
//! nothing; readers of the source chain during a merge always see the source's pre-merge
//! view; a process holding the destination open read-only does not stop a merge; a process
//! holding a lock on the source (or an intermediate) does, with 32774.
//!
//! No timing is relied on: a merge is held inside its first write (a storage wrapper waits
//! there) while the competing merge runs, so the two always overlap. Waits are bounded only
//! so that a bug cannot hang the suite.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::Duration;

use common::model::{BaseKind, Built, ChainSpec, build_chain};
use common::storage::faulty;
use common::{Rng, fast_tempdir, file_hash, hashes, read_view, serial};
use vhd_merge::io::{FaultPlan, FaultyStorage, Storage};
use vhd_merge::merge::{MergeOptions, StorageWrapper, merge};
use vhd_merge::{Chain, ChainOptions, MergeJob, ReturnCode};

const KIB: u32 = 1024;
const MIB: u32 = 1 << 20;

/// Longest any wait here lasts before giving up (a bug, not a slow machine, would get there).
const PATIENCE: Duration = Duration::from_secs(120);

/// A chain of four layers (destination two levels up is possible) with mixed block sizes.
fn chain(dir: &Path, seed: u64) -> Built {
    build_chain(
        dir,
        &ChainSpec {
            size_sectors: 16384 + 7,
            base: BaseKind::Dynamic,
            block_sizes: vec![512 * KIB, MIB, 2 * MIB, MIB],
            density: vec![60, 50, 40, 50],
            seed,
        },
    )
}

/// Storage that calls `hook` before each write (with the 1-based write number).
struct Hooked {
    inner: Box<dyn Storage>,
    writes: AtomicU64,
    hook: Arc<dyn Fn(u64) + Send + Sync>,
}

impl std::fmt::Debug for Hooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooked")
            .field("inner", &self.inner)
            .finish()
    }
}

impl Storage for Hooked {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        (self.hook)(n);
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn try_lock(&self, exclusive: bool) -> std::io::Result<bool> {
        self.inner.try_lock(exclusive)
    }
}

/// A wrapper counting the destination's writes and syncs in `count` and calling `hook`
/// before each write.
fn hooked(count: Arc<FaultPlan>, hook: Arc<dyn Fn(u64) + Send + Sync>) -> StorageWrapper {
    Arc::new(move |s| {
        Box::new(Hooked {
            inner: Box::new(FaultyStorage::new(s, count.clone())),
            writes: AtomicU64::new(0),
            hook: hook.clone(),
        })
    })
}

/// A one-shot signal.
#[derive(Default)]
struct Signal(Mutex<bool>, Condvar);

impl Signal {
    fn set(&self) {
        *self.0.lock().unwrap() = true;
        self.1.notify_all();
    }
    /// Wait until set (false if the patience ran out).
    fn wait(&self) -> bool {
        let g = self.0.lock().unwrap();
        let (g, _) = self.1.wait_timeout_while(g, PATIENCE, |s| !*s).unwrap();
        *g
    }
}

fn others(built: &Built, dest: usize) -> Vec<PathBuf> {
    built
        .paths
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != dest)
        .map(|(_, p)| p.clone())
        .collect()
}

/// Two threads start a merge into the same destination at the same moment. Whichever takes
/// the lock first is held inside its first write until the other has returned: the other must
/// have failed with 32774 without a single write or sync, and left the destination as it was.
#[test]
fn two_threads_merging_into_one_destination() {
    let _serial = serial();
    for round in 0..6u64 {
        let dir = fast_tempdir();
        let built = chain(dir.path(), 100 + round);
        let d = 1 + (round % 2) as usize;
        let src = built.paths[0].clone();
        let dest = built.paths[d].clone();
        let dest_before = file_hash(&dest);
        let others_before = hashes(&others(&built, d));

        let inside = Arc::new(Signal::default());
        let loser_done = Arc::new(Signal::default());
        let release = Arc::new(Signal::default());
        let barrier = Arc::new(Barrier::new(2));
        let mut handles = Vec::new();
        for _ in 0..2 {
            let count = FaultPlan::new();
            let (inside, release) = (inside.clone(), release.clone());
            let hook: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |n| {
                if n == 1 {
                    inside.set();
                    release.wait();
                }
            });
            let o = MergeOptions::default()
                .destination_io(Some(hooked(count.clone(), hook)))
                .batch_bytes(1 << 20);
            let (src, dest, barrier) = (src.clone(), dest.clone(), barrier.clone());
            let loser_done = loser_done.clone();
            handles.push(std::thread::spawn(move || {
                barrier.wait();
                let r = merge(&src, Some(&dest), &o);
                if r.is_err() {
                    loser_done.set();
                }
                (r, count)
            }));
        }
        // While the winner is held at its first write, nothing has changed yet.
        assert!(
            inside.wait(),
            "round {round}: no merge reached its first write"
        );
        assert!(
            loser_done.wait(),
            "round {round}: the second merge did not return"
        );
        assert_eq!(
            file_hash(&dest),
            dest_before,
            "round {round}: the loser wrote"
        );
        release.set();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let mut won = 0;
        for (r, count) in &results {
            match r {
                Ok(rep) => {
                    won += 1;
                    assert_eq!(rep.bytes_merged, rep.plan.bytes_total);
                }
                Err(e) => {
                    assert_eq!(e.return_code(), ReturnCode::SystemInUse, "{e}");
                    assert!(e.to_string().contains("in use"), "{e}");
                    assert_eq!(
                        (count.writes(), count.syncs()),
                        (0, 0),
                        "round {round}: the merge that lost the lock wrote or synced"
                    );
                }
            }
        }
        assert_eq!(won, 1, "round {round}: exactly one merge proceeds");
        assert_eq!(read_view(&dest), built.model.merged(d), "round {round}");
        assert_eq!(hashes(&others(&built, d)), others_before, "round {round}");
    }
}

// ---- Processes. ----

const CHILD_ENV: &str = "VHD_MERGE_CONCURRENCY_CHILD";

/// Not a test of its own: the body of the child process that
/// [`two_processes_merging_into_one_destination`] starts (this test binary, run again with
/// this test selected and the job in the environment). It merges, holding still at its first
/// write until the parent creates the release file.
#[test]
fn child_process_merge() {
    let Ok(job) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = job.split('\n');
    let mut next = || PathBuf::from(parts.next().expect("child job: 4 lines"));
    let (src, dest, ready, release) = (next(), next(), next(), next());
    let hook: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |n| {
        if n != 1 {
            return;
        }
        std::fs::write(&ready, b"at first write").unwrap();
        let start = std::time::Instant::now();
        while !release.exists() && start.elapsed() < PATIENCE {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let o = MergeOptions::default().destination_io(Some(hooked(FaultPlan::new(), hook)));
    let r = merge(&src, Some(&dest), &o).expect("the child's merge");
    println!("child merged {} bytes", r.bytes_merged);
}

fn start_child(src: &Path, dest: &Path, ready: &Path, release: &Path) -> Child {
    let job = [src, dest, ready, release]
        .iter()
        .map(|p| p.to_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    // The test's name in this binary: its module path without the crate.
    let name = concat!(module_path!(), "::child_process_merge");
    let name = name.split_once("::").map_or(name, |(_, rest)| rest);
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, job)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for_file(p: &Path, child: &mut Child) {
    let start = std::time::Instant::now();
    while !p.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the child exited ({status}) before its first write: {err}");
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the child never reached its first write"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Another process is in the middle of merging into the destination (held at its first
/// write): a merge from this process and one from a third process (the CLI) both get 32774
/// and write nothing; released, the first merge completes exactly.
#[test]
fn two_processes_merging_into_one_destination() {
    let _serial = serial();
    let dir = fast_tempdir();
    let built = chain(dir.path(), 7);
    let d = 2;
    let (src, dest) = (built.paths[0].clone(), built.paths[d].clone());
    let ctl = tempfile::tempdir().unwrap();
    let (ready, release) = (ctl.path().join("ready"), ctl.path().join("release"));
    let mut child = start_child(&src, &dest, &ready, &release);
    wait_for_file(&ready, &mut child);
    let dest_before = file_hash(&dest);
    let others_before = hashes(&others(&built, d));

    let count = FaultPlan::new();
    let o = MergeOptions::default().destination_io(Some(faulty(count.clone())));
    let e = merge(&src, Some(&dest), &o).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::SystemInUse, "{e}");
    assert_eq!((count.writes(), count.syncs()), (0, 0));
    #[cfg(feature = "cli")]
    {
        let out = Command::new(env!("CARGO_BIN_EXE_vhd-merge"))
            .arg("merge")
            .arg(&src)
            .arg(&dest)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("error 32774 (System is in use)"), "{err}");
    }
    assert_eq!(file_hash(&dest), dest_before, "a refused merge wrote");
    assert_eq!(hashes(&others(&built, d)), others_before);

    std::fs::write(&release, b"go").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the child's merge failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("child merged"));
    assert_eq!(read_view(&dest), built.model.merged(d));
    assert_eq!(hashes(&others(&built, d)), others_before);
}

/// Several CLI processes started together on one merge, without any holding back: each one
/// either completes or gets 32774; at least one completes; the result is exact and no other
/// file changes. (Which ones overlap is up to the scheduler; the held-back tests above make
/// the overlap certain.)
#[cfg(feature = "cli")]
#[test]
fn racing_cli_merges() {
    let _serial = serial();
    let dir = fast_tempdir();
    let built = chain(dir.path(), 8);
    let d = 3;
    let others_before = hashes(&others(&built, d));
    let children: Vec<Child> = (0..4)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_vhd-merge"))
                .arg("merge")
                .arg(&built.paths[0])
                .arg(&built.paths[d])
                .arg("--json")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ok = 0;
    let mut busy = 0;
    for c in children {
        let out = c.wait_with_output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        match json["error"]["return_code"].as_u64() {
            None => {
                assert!(out.status.success());
                ok += 1;
            }
            Some(32774) => {
                assert!(!out.status.success());
                busy += 1;
            }
            other => panic!("unexpected return code {other:?}: {json}"),
        }
    }
    eprintln!("racing CLI merges: {ok} completed, {busy} got 32774");
    assert!(ok >= 1);
    assert_eq!(read_view(&built.paths[d]), built.model.merged(d));
    assert_eq!(hashes(&others(&built, d)), others_before);
}

// ---- Readers of the source during a merge. ----

/// Read the whole view of layer 0 of `chain` through `Chain::read_at` in pieces of varying
/// size, and through a `ChainReader`.
fn read_source_both_ways(chain: &Chain, size: usize, rng: &mut Rng) -> (Vec<u8>, Vec<u8>) {
    let mut a = vec![0u8; size];
    let mut at = 0usize;
    while at < size {
        let n = ((1 + rng.below(64)) as usize * 512).min(size - at);
        chain.read_at(0, at as u64, &mut a[at..at + n]).unwrap();
        at += n;
    }
    let mut b = Vec::with_capacity(size);
    let mut r = chain.reader(0).unwrap();
    // Odd-sized reads through the read-ahead window.
    let mut piece = vec![0u8; 3 * 512 + 17];
    loop {
        let n = r.read(&mut piece).unwrap();
        if n == 0 {
            break;
        }
        b.extend_from_slice(&piece[..n]);
    }
    (a, b)
}

/// At every write of a merge (made from inside the destination's storage, so the write is
/// one step from landing or has just landed), the source's view read through a chain opened
/// before the merge and through a chain opened at that moment is exactly the pre-merge view.
#[test]
fn source_view_is_unchanged_at_every_write() {
    let _serial = serial();
    let dir = fast_tempdir();
    let built = chain(dir.path(), 9);
    let d = 3;
    let want = Arc::new(built.model.view(0));
    let src = built.paths[0].clone();
    let early = Arc::new(Chain::open(&src, &ChainOptions::default()).unwrap());
    let checked = Arc::new(AtomicU64::new(0));
    let (w, e, s, c) = (want.clone(), early.clone(), src.clone(), checked.clone());
    let hook: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |n| {
        let mut rng = Rng::new(n);
        let (a, b) = read_source_both_ways(&e, w.len(), &mut rng);
        assert!(
            a == *w && b == *w,
            "write {n}: the early chain sees a change"
        );
        let fresh = Chain::open(&s, &ChainOptions::default()).unwrap();
        let (a, b) = read_source_both_ways(&fresh, w.len(), &mut rng);
        assert!(
            a == *w && b == *w,
            "write {n}: a chain opened now sees a change"
        );
        c.fetch_add(1, Ordering::SeqCst);
    });
    let count = FaultPlan::new();
    let o = MergeOptions::default()
        .destination_io(Some(hooked(count.clone(), hook)))
        .batch_bytes(1 << 20);
    merge(&src, Some(&built.paths[d]), &o).unwrap();
    assert_eq!(checked.load(Ordering::SeqCst), count.writes());
    assert!(count.writes() > 10, "{} writes", count.writes());
    eprintln!("source view checked at each of {} writes", count.writes());
    let (a, b) = read_source_both_ways(&early, want.len(), &mut Rng::new(0));
    assert!(a == *want && b == *want);
    assert_eq!(read_view(&built.paths[d]), *want);
}

/// A reader thread reads the source's view in a loop while a merge job runs, truly in
/// parallel: before each write the merge waits until the reader has started a new pass, so
/// every write overlaps a pass. Every pass sees exactly the pre-merge view.
#[test]
fn reader_thread_during_a_merge_job() {
    let _serial = serial();
    let dir = fast_tempdir();
    let built = chain(dir.path(), 10);
    let d = 2;
    let want = Arc::new(built.model.view(0));
    let src = built.paths[0].clone();

    let passes = Arc::new((Mutex::new(0u64), Condvar::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (passes, stop, want, src) = (passes.clone(), stop.clone(), want.clone(), src.clone());
        std::thread::spawn(move || {
            let chain = Chain::open(&src, &ChainOptions::default()).unwrap();
            let mut rng = Rng::new(77);
            let mut bad = 0u64;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                {
                    let mut p = passes.0.lock().unwrap();
                    *p += 1;
                    n = *p;
                    passes.1.notify_all();
                }
                let (a, b) = read_source_both_ways(&chain, want.len(), &mut rng);
                bad += u64::from(a != *want) + u64::from(b != *want);
            }
            (n, bad)
        })
    };
    let p2 = passes.clone();
    let hook: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |_| {
        // Wait for the reader to start one more pass, then let the write go ahead while the
        // pass runs.
        let g = p2.0.lock().unwrap();
        let seen = *g;
        let _g =
            p2.1.wait_timeout_while(g, PATIENCE, |p| *p <= seen)
                .unwrap();
    });
    let count = FaultPlan::new();
    let o = MergeOptions::default()
        .destination_io(Some(hooked(count.clone(), hook)))
        .batch_bytes(1 << 20);
    let job = MergeJob::start(&src, Some(&built.paths[d]), o).unwrap();
    let r = job.wait();
    stop.store(true, Ordering::SeqCst);
    let (n, bad) = reader.join().unwrap();
    r.unwrap();
    assert_eq!(bad, 0, "a pass of the reader saw a changed source");
    assert!(
        n >= count.writes(),
        "{n} passes for {} writes",
        count.writes()
    );
    eprintln!(
        "reader: {n} passes over the source during {} writes",
        count.writes()
    );
    assert_eq!(read_view(&built.paths[d]), *want);
}

// ---- Other processes holding the files. ----

/// A shell that opens `file` (read-only, or under `flock` with `lock_args`) and waits for its
/// standard input to close.
struct Holder {
    child: Child,
}

impl Holder {
    fn read_only(file: &Path) -> Holder {
        Holder::start(
            Command::new("sh")
                .arg("-c")
                .arg("exec 3<\"$1\"; echo ready; read x")
                .arg("sh")
                .arg(file),
        )
    }

    fn flock(file: &Path, mode: &str) -> Option<Holder> {
        let ok = Command::new("flock")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("note: flock(1) unavailable; skipping the locked-by-another-process case");
            return None;
        }
        Some(Holder::start(
            Command::new("flock")
                .arg(mode)
                .arg(file)
                .arg("sh")
                .arg("-c")
                .arg("echo ready; read x"),
        ))
    }

    fn start(cmd: &mut Command) -> Holder {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        Holder { child }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(mut i) = self.child.stdin.take() {
            let _ = i.write_all(b"\n");
        }
        let _ = self.child.wait();
    }
}

#[cfg_attr(not(unix), ignore = "holds the file open in another process with sh")]
#[test]
fn destination_open_read_only_in_another_process_is_fine() {
    let _serial = serial();
    let dir = fast_tempdir();
    let built = chain(dir.path(), 11);
    let d = 1;
    let _holder = Holder::read_only(&built.paths[d]);
    let r = merge(&built.paths[0], None, &MergeOptions::default()).unwrap();
    assert_eq!(r.bytes_merged, r.plan.bytes_total);
    assert_eq!(read_view(&built.paths[d]), built.model.merged(d));
}

/// Another process holding a lock on the source, on an intermediate (exclusively), or on the
/// destination (even shared: a reader that locks) stops a merge with 32774 before anything
/// is written.
#[cfg_attr(
    not(unix),
    ignore = "locks the files from another process with flock(1)"
)]
#[test]
fn files_locked_by_another_process_give_system_in_use() {
    let _serial = serial();
    let dir = fast_tempdir();
    let built = chain(dir.path(), 12);
    let d = 2;
    let before = hashes(&built.paths);
    let cases = [
        (0, "-x", "the source, exclusively"),
        (1, "-x", "an intermediate, exclusively"),
        (d, "-s", "the destination, shared"),
        (d, "-x", "the destination, exclusively"),
    ];
    for (layer, mode, what) in cases {
        let Some(_holder) = Holder::flock(&built.paths[layer], mode) else {
            return;
        };
        let count = FaultPlan::new();
        let o = MergeOptions::default().destination_io(Some(faulty(count.clone())));
        let e = merge(&built.paths[0], Some(&built.paths[d]), &o).unwrap_err();
        assert_eq!(e.return_code(), ReturnCode::SystemInUse, "{what}: {e}");
        let name = built.paths[layer].file_name().unwrap().to_str().unwrap();
        assert!(
            e.to_string().contains(name) && e.to_string().contains("in use"),
            "{what}: {e}"
        );
        assert_eq!((count.writes(), count.syncs()), (0, 0), "{what}");
        assert_eq!(hashes(&built.paths), before, "{what}: a file changed");
    }
    // A shared lock on the source (another reader that locks) does not stop it.
    let Some(_holder) = Holder::flock(&built.paths[0], "-s") else {
        return;
    };
    merge(
        &built.paths[0],
        Some(&built.paths[d]),
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(read_view(&built.paths[d]), built.model.merged(d));
}

// ---- Other writers during a merge (issue 9, defect 2). ----

/// What the library's writers do to `target` while a merge holds it: each result, by name.
fn library_writers(target: &Path, other: &Path) -> Vec<(&'static str, vhd_merge::Result<()>)> {
    use vhd_merge::create::{CreateOptions, create_dynamic, create_fixed};
    use vhd_merge::flatten::{FlattenOptions, flatten_path};
    use vhd_merge::repair::{RepairOptions, repair_file};
    use vhd_merge::setparent::{SetParentOptions, set_parent};
    let force = CreateOptions::default().overwrite(true);
    let flatten = FlattenOptions::default().force(true);
    let reparent = SetParentOptions::default().force(true);
    vec![
        (
            "create dynamic --force",
            create_dynamic(target, 1 << 20, &force).map(drop),
        ),
        (
            "create fixed --force",
            create_fixed(target, 1 << 20, &force).map(drop),
        ),
        ("set-parent", set_parent(target, other, &reparent).map(drop)),
        (
            "flatten --force",
            flatten_path(other, &ChainOptions::default(), target, flatten).map(drop),
        ),
        (
            "repair",
            repair_file(target, &RepairOptions::default()).map(|r| {
                assert!(!r.wrote, "repair wrote {}: {r:?}", target.display());
            }),
        ),
    ]
}

/// The same commands through the CLI: (name, exit status, stderr).
#[cfg(feature = "cli")]
fn cli_writers(target: &Path, other: &Path) -> Vec<(&'static str, Option<i32>, String)> {
    let t = target.to_str().unwrap();
    let o = other.to_str().unwrap();
    let runs: [(&str, Vec<&str>); 5] = [
        (
            "create dynamic --force",
            vec!["create", "dynamic", t, "--size", "1M", "--force"],
        ),
        (
            "create fixed --force",
            vec!["create", "fixed", t, "--size", "1M", "--force"],
        ),
        ("set-parent --force", vec!["set-parent", t, o, "--force"]),
        ("flatten --force", vec!["flatten", o, t, "--force", "-q"]),
        ("repair", vec!["repair", t]),
    ];
    runs.into_iter()
        .map(|(name, args)| {
            let out = Command::new(env!("CARGO_BIN_EXE_vhd-merge"))
                .args(args)
                .output()
                .unwrap();
            (
                name,
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
        .collect()
}

/// A merge is held at its first write, every lock taken, while create --force, set-parent,
/// flatten --force and repair (library and CLI) try to write over its source and over its
/// destination: each gets System is in use (32774) and no file changes (repair of the source,
/// which the merge only reads, finds nothing to repair and writes nothing). Released, the
/// merge finishes exactly.
#[test]
fn writers_are_refused_while_a_merge_holds_the_files() {
    let _serial = serial();
    let dir = fast_tempdir();
    let built = chain(dir.path(), 11);
    let d = 2;
    let (src, dest) = (built.paths[0].clone(), built.paths[d].clone());
    let other = dir.path().join("other.vhd");
    let opts = vhd_merge::create::CreateOptions::default();
    drop(vhd_merge::create::create_dynamic(&other, 16384 * 512 + 7 * 512, &opts).unwrap());
    let (inside, release) = (Arc::new(Signal::default()), Arc::new(Signal::default()));
    let (i2, r2) = (inside.clone(), release.clone());
    let hook: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |n| {
        if n == 1 {
            i2.set();
            r2.wait();
        }
    });
    let o = MergeOptions::default().destination_io(Some(hooked(FaultPlan::new(), hook)));
    let (s2, d2) = (src.clone(), dest.clone());
    let merging = std::thread::spawn(move || merge(&s2, Some(&d2), &o));
    assert!(inside.wait(), "the merge never reached its first write");
    let mut all = built.paths.clone();
    all.push(other.clone());
    let before = hashes(&all);

    for target in [&src, &dest] {
        for (name, r) in library_writers(target, &other) {
            match r {
                Err(e) => {
                    assert_eq!(e.return_code(), ReturnCode::SystemInUse, "{name}: {e}");
                    assert!(e.to_string().contains("in use"), "{name}: {e}");
                }
                Ok(()) => assert!(
                    name == "repair" && *target == src,
                    "{name} over {} succeeded during the merge",
                    target.display()
                ),
            }
            assert_eq!(hashes(&all), before, "{name} over {}", target.display());
        }
        #[cfg(feature = "cli")]
        for (name, code, err) in cli_writers(target, &other) {
            if name == "repair" && *target == src {
                assert_eq!(code, Some(0), "{name}: {err}");
            } else {
                assert_eq!(code, Some(1), "{name}: {err}");
                assert!(
                    err.contains("error 32774 (System is in use)"),
                    "{name}: {err}"
                );
            }
            assert_eq!(hashes(&all), before, "CLI {name} over {}", target.display());
        }
    }
    release.set();
    let report = merging.join().unwrap().expect("the held merge");
    assert_eq!(report.bytes_merged, report.plan.bytes_total);
    assert_eq!(read_view(&dest), built.model.merged(d));
    let deep = vhd_merge::check::CheckOptions::default().deep(true);
    let r = vhd_merge::check::check_file(&dest, &deep).unwrap();
    assert!(!r.has_errors(), "{:#?}", r.findings);
}
