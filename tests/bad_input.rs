//! The bad-input catalogue: files damaged in one way each, and hostile paths. Every case
//! checks the `MergeVirtualHardDisk` return code, key words of the message, that nothing
//! panics, that no file's bytes change, and (through a counting allocator) that opening
//! allocates no more than the file's size justifies.
//!
//! The merge cases (c40 on) run the merge engine on such files: a read-only or full
//! destination, a damaged child or destination, a source or destination that is the wrong
//! kind of file, a sibling in the way, a missing parent in the middle of the chain.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use common::os::{Mount, unwritable};
use common::patch::*;
use common::{read, serial, snapshot};
use vhd_merge::check::{CheckOptions, check_file};
use vhd_merge::create::create_dynamic;
use vhd_merge::format::PlatformCode;
use vhd_merge::io::{FaultPlan, FaultyStorage, FileStorage, MemStorage};
use vhd_merge::{Chain, ChainOptions, Error, OpenOptions, ReturnCode, Vhd};

// ---- A per-thread counting allocator: peak live bytes during an operation. ----

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

/// The same for the whole process (every thread; tests running in parallel can only make a
/// measured peak larger).
static ALL_LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static ALL_PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn track(grow: usize, shrink: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    if grow > 0 {
        let n = ALL_LIVE.fetch_add(grow, Relaxed) + grow;
        ALL_PEAK.fetch_max(n, Relaxed);
    }
    if shrink > 0 {
        ALL_LIVE.fetch_sub(shrink, Relaxed);
    }
    // try_with: the thread-locals may be gone while a thread is torn down.
    let _ = LIVE.try_with(|l| {
        let n = (l.get() + grow).saturating_sub(shrink);
        l.set(n);
        let _ = PEAK.try_with(|p| p.set(p.get().max(n)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the bookkeeping only
// touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size(), 0);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size(), 0);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        track(0, layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size, layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Run `f` and return its result with the peak number of bytes it had allocated at once
/// (on this thread).
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get).saturating_sub(base))
}

/// Run `f` and return its result with the peak number of bytes the whole process had
/// allocated at once beyond what it held before (threads `f` starts included).
fn peak_all_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    use std::sync::atomic::Ordering::SeqCst;
    let base = ALL_LIVE.load(SeqCst);
    ALL_PEAK.store(base, SeqCst);
    let out = f();
    (out, ALL_PEAK.load(SeqCst).saturating_sub(base))
}

/// What opening a file may allocate beyond the file's own size: bookkeeping, messages, and
/// one block-sized buffer at most for the small blocks of these tests.
const SLACK: usize = 1 << 20;

// ---- Case helpers. ----

fn expect_err(e: &Error, rc: ReturnCode, words: &[&str]) {
    assert_eq!(e.return_code(), rc, "wrong code for: {e}");
    let msg = e.to_string();
    for w in words {
        assert!(msg.contains(w), "message {msg:?} lacks {w:?}");
    }
}

/// Opening `p` (read-only and writable, strict) fails with `rc` and `words`; a lenient open
/// fails the same way unless `lenient_ok`; check reports an error; nothing is written; opening
/// allocates within the bound.
fn open_fails(p: &Path, rc: ReturnCode, words: &[&str], lenient_ok: bool) {
    let dir = p.parent().unwrap();
    let before = snapshot(dir);
    let len = std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0);
    for writable in [false, true] {
        let o = OpenOptions::default().set_writable(writable);
        let (r, peak) = peak_of(|| Vhd::open(p, o));
        let e = r.expect_err("opened");
        expect_err(&e, rc, words);
        assert!(
            peak <= len + SLACK,
            "open allocated {peak} bytes for a {len}-byte file"
        );
    }
    let lenient = OpenOptions::default().lenient(true);
    match Vhd::open(p, lenient) {
        Ok(_) => assert!(lenient_ok, "lenient open succeeded"),
        Err(e) => {
            assert!(!lenient_ok, "lenient open failed: {e}");
            expect_err(&e, rc, words);
        }
    }
    let deep = CheckOptions::default().deep(true);
    let (r, peak) = peak_of(|| check_file(p, &deep));
    assert!(r.unwrap().has_errors());
    assert!(
        peak <= len + SLACK,
        "check allocated {peak} bytes for a {len}-byte file"
    );
    assert_eq!(snapshot(dir), before, "a file changed");
}

/// Opening works (the damage does not stop reading) with a warning containing `warning`;
/// check reports an error with `code`; nothing is written.
fn opens_with_warning(p: &Path, warning: &str, code: &str) {
    let dir = p.parent().unwrap();
    let before = snapshot(dir);
    let v = Vhd::open(p, OpenOptions::read_only()).unwrap();
    assert!(
        v.warnings().iter().any(|w| w.contains(warning)),
        "{:?}",
        v.warnings()
    );
    drop(v);
    let r = check_file(p, &CheckOptions::default()).unwrap();
    assert!(r.has_errors());
    assert!(
        r.findings.iter().any(|f| f.code == code),
        "{:#?}",
        r.findings
    );
    assert_eq!(snapshot(dir), before, "a file changed");
}

fn chain_fails(child: &Path, o: &ChainOptions, rc: ReturnCode, words: &[&str]) {
    let dir = child.parent().unwrap();
    let before = snapshot(dir);
    let e = Chain::open(child, o).expect_err("chain opened");
    expect_err(&e, rc, words);
    assert_eq!(snapshot(dir), before, "a file changed");
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn len_of(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// Set locator `i`'s payload (written over its reserved space) and length.
fn set_locator_payload(p: &Path, i: usize, payload: &[u8]) {
    let h = header(p);
    let off = h.locators[i].data_offset;
    assert!(payload.len() as u32 <= h.locators[i].data_space);
    patch(p, off, payload);
    edit_header(p, |h| h.locators[i].data_length = payload.len() as u32);
}

fn w2ru(text: &str) -> Vec<u8> {
    PlatformCode::W2ru.encode_payload(text)
}

/// A child whose only way to its parent is locator 0 (W2ru) and the header name `name`.
fn child_with_only_w2ru(d: &Path, name: &str) -> PathBuf {
    let base = dynamic(d, "base.vhd");
    let c = child(d, "c.vhd", &base);
    edit_header(&c, |h| {
        h.locators[1] = vhd_merge::format::ParentLocator::EMPTY;
        h.locators[2] = vhd_merge::format::ParentLocator::EMPTY;
        h.set_parent_name(name).unwrap();
    });
    c
}

// ---- Truncation inside each structure. ----

#[test]
fn c01_empty_file() {
    let d = tmp();
    let p = d.path().join("e.vhd");
    std::fs::write(&p, b"").unwrap();
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["0 bytes", "smaller than a VHD footer"],
        false,
    );
}

#[test]
fn c02_fixed_disk_truncated_inside_its_footer() {
    let d = tmp();
    let p = fixed(d.path(), "f.vhd");
    truncate(&p, len_of(&p) - 100);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["not a VHD", "conectix"],
        false,
    );
}

#[test]
fn c03_dynamic_disk_truncated_inside_its_footer_opens_from_the_copy() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    truncate(&p, len_of(&p) - 100);
    opens_with_warning(&p, "using the copy at offset 0", "footer-end-bad");
}

#[test]
fn c04_truncated_inside_the_header() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    truncate(&p, 1400);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["Data Offset", "dynamic header inside the file"],
        false,
    );
}

#[test]
fn c05_truncated_inside_the_bat() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    let h = header(&p);
    truncate(&p, h.table_offset + 40);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["BAT", "runs past the end of the file"],
        false,
    );
}

#[test]
fn c06_truncated_inside_a_block() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    let b5 = u64::from(bat_entry(&p, 5)) * 512;
    truncate(&p, b5 + 512 + 1000);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["BAT entry 5", "past the end of data"],
        false,
    );
}

#[test]
fn c07_truncated_inside_a_locator() {
    let d = tmp();
    let base = dynamic(d.path(), "base.vhd");
    let c = d.path().join("c.vhd");
    drop(vhd_merge::create::create_differencing(&c, &base, &opts()).unwrap());
    let h = header(&c);
    let last = h.locators.iter().map(|l| l.data_offset).max().unwrap();
    truncate(&c, last + 5);
    opens_with_warning(&c, "lies outside the file", "locator-outside");
    // The chain still resolves through the intact W2ru locator.
    assert_eq!(Chain::open(&c, &ChainOptions::default()).unwrap().len(), 2);
}

// ---- Cookies and checksums. ----

#[test]
fn c08_bad_footer_cookie_fixed() {
    let d = tmp();
    let p = fixed(d.path(), "f.vhd");
    patch(&p, len_of(&p) - 512, b"notavhd!");
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["not a VHD", "\"notavhd!\"", "conectix"],
        false,
    );
}

#[test]
fn c09_bad_footer_cookie_in_both_copies() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    patch(&p, len_of(&p) - 512, b"CONECTIX");
    patch(&p, 0, b"CONECTIX");
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["not a VHD", "no valid copy at offset 0"],
        false,
    );
}

#[test]
fn c10_poisoned_cookie() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    patch(&p, len_of(&p) - 512, b"v_poison");
    patch(&p, 0, b"v_poison");
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["v_poison", "blktap disabled"],
        false,
    );
}

#[test]
fn c11_bad_header_cookie() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    patch(&p, header_offset(&p), b"cxsparsX");
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["cxsparse", "at offset 512"],
        false,
    );
}

#[test]
fn c12_bad_footer_checksum() {
    let d = tmp();
    let p = fixed(d.path(), "f.vhd");
    patch(&p, len_of(&p) - 512 + 64, &[0, 0, 0, 1]);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["footer checksum mismatch", "leniently"],
        true,
    );
}

#[test]
fn c13_bad_header_checksum() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    patch(&p, header_offset(&p) + 36, &[0, 0, 0, 1]);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["dynamic header checksum mismatch", "offset 512"],
        true,
    );
}

// ---- Offsets and sizes. ----

#[test]
fn c14_data_offset_outside_the_file() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    let len = len_of(&p);
    edit_footer(&p, |f| f.data_offset = len * 4);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["Data Offset", "inside the file"],
        false,
    );
}

#[test]
fn c15_data_offset_over_the_footer_copy() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    edit_footer(&p, |f| f.data_offset = 0);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["Data Offset 0x0"],
        false,
    );
}

#[test]
fn c16_bat_beyond_end_of_file() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    let len = len_of(&p);
    edit_header(&p, |h| h.table_offset = len + 4096);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["BAT at offset", "past the end of the file"],
        false,
    );
}

#[test]
fn c17_huge_max_table_entries() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    edit_header(&p, |h| h.max_table_entries = u32::MAX);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["4294967295 entries", "past the end of the file"],
        false,
    );
}

#[test]
fn c18_max_table_entries_too_small() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    edit_header(&p, |h| h.max_table_entries = 3);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["Max Table Entries 3", "less than Current Size"],
        false,
    );
}

#[test]
fn c19_block_size_zero() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    edit_header(&p, |h| h.block_size = 0);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["Block Size 0", "power of two"],
        false,
    );
}

#[test]
fn c20_block_size_odd() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    edit_header(&p, |h| h.block_size = 65537);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["Block Size 65537", "power of two"],
        false,
    );
}

#[test]
fn c21_block_size_not_a_power_of_two() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    edit_header(&p, |h| h.block_size = 3 * 512);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["Block Size 1536", "power of two"],
        false,
    );
}

#[test]
fn c22_block_size_huge() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    edit_header(&p, |h| h.block_size = 1 << 31);
    open_fails(
        &p,
        ReturnCode::NotSupported,
        &["Block Size 2147483648", "larger than"],
        false,
    );
}

#[test]
fn c23_overlapping_blocks() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    set_bat_entry(&p, 9, bat_entry(&p, 1) + 16);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["block 1", "overlaps block 9"],
        false,
    );
}

#[test]
fn c24_block_overlapping_the_bat() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    let h = header(&p);
    set_bat_entry(&p, 2, (h.table_offset / 512) as u32);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["the BAT", "overlaps block 2"],
        false,
    );
}

#[test]
fn c25_bat_overlapping_the_header() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    edit_header(&p, |h| h.table_offset = 1024);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["BAT at offset 0x400", "overlaps"],
        false,
    );
}

/// Found by fuzzing: a BAT (or header) running into the end footer was accepted, and the
/// first BAT update destroyed the footer.
#[test]
fn c39_metadata_overlapping_the_end_footer() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    let len = len_of(&p);
    edit_header(&p, |h| h.table_offset = len - 520);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["BAT at offset", "overlaps the end footer"],
        false,
    );
    let e = vhd_merge::repair::repair_file(&p, &Default::default()).unwrap_err();
    expect_err(
        &e,
        ReturnCode::IncorrectDataType,
        &["cannot repair", "end footer"],
    );
    let p = dynamic(d.path(), "b.vhd");
    let len = len_of(&p);
    edit_footer(&p, |f| f.data_offset = len - 1024);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["dynamic header at offset", "overlaps the end footer"],
        false,
    );
}

#[test]
fn c26_unknown_disk_type_and_versions() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    edit_footer(&p, |f| f.disk_type = vhd_merge::DiskType::Other(5));
    open_fails(
        &p,
        ReturnCode::NotSupported,
        &["disk type 5", "not supported"],
        false,
    );
    let p = dynamic(d.path(), "b.vhd");
    edit_footer(&p, |f| f.format_version = 0x0002_0000);
    open_fails(
        &p,
        ReturnCode::NotSupported,
        &["File Format Version 0x00020000"],
        false,
    );
    let p = dynamic(d.path(), "c.vhd");
    edit_header(&p, |h| h.header_version = 0x0003_0000);
    open_fails(
        &p,
        ReturnCode::NotSupported,
        &["header version 0x00030000"],
        false,
    );
    let p = dynamic(d.path(), "e.vhd");
    edit_footer(&p, |f| f.current_size += 100);
    open_fails(
        &p,
        ReturnCode::IncorrectDataType,
        &["Current Size", "not a multiple of 512"],
        false,
    );
}

// ---- Locators and parent names. ----

#[test]
fn c27_locator_offset_outside_the_file() {
    let d = tmp();
    let c = child_with_only_w2ru(d.path(), "nowhere.vhd");
    let len = len_of(&c);
    edit_header(&c, |h| h.locators[0].data_offset = len + (1 << 40));
    opens_with_warning(&c, "lies outside the file", "locator-outside");
    chain_fails(
        &c,
        &ChainOptions::default(),
        ReturnCode::FileNotFound,
        &["not found", "nowhere.vhd"],
    );
}

#[test]
fn c28_huge_locator_length() {
    let d = tmp();
    let c = child_with_only_w2ru(d.path(), "nowhere.vhd");
    edit_header(&c, |h| h.locators[0].data_length = u32::MAX);
    opens_with_warning(&c, "lies outside the file", "locator-outside");
    let before = snapshot(d.path());
    let (r, peak) = peak_of(|| Chain::open(&c, &ChainOptions::default()));
    expect_err(&r.unwrap_err(), ReturnCode::FileNotFound, &["not found"]);
    assert!(peak <= SLACK * 4, "chain open allocated {peak} bytes");
    assert_eq!(snapshot(d.path()), before);
}

#[test]
fn c29_invalid_utf16_in_the_parent_name() {
    let d = tmp();
    let c = child_with_only_w2ru(d.path(), "x");
    // An unpaired high surrogate, then "ab".
    edit_header(&c, |h| {
        h.parent_name_raw = [0; 512];
        h.parent_name_raw[..6].copy_from_slice(&[0xD8, 0x00, 0x00, b'a', 0x00, b'b']);
    });
    set_locator_payload(&c, 0, &w2ru(".\\missing.vhd"));
    chain_fails(
        &c,
        &ChainOptions::default(),
        ReturnCode::FileNotFound,
        &["\u{FFFD}ab", "missing.vhd"],
    );
}

#[test]
fn c30_invalid_utf16_in_the_w2ru_payload() {
    let d = tmp();
    let c = child_with_only_w2ru(d.path(), "gone.vhd");
    // ".\" then an unpaired low surrogate, then "p.vhd"; and an odd trailing byte.
    let mut payload = w2ru(".\\");
    payload.extend_from_slice(&[0x00, 0xDC]);
    payload.extend(w2ru("p.vhd"));
    payload.push(0x41);
    set_locator_payload(&c, 0, &payload);
    chain_fails(
        &c,
        &ChainOptions::default(),
        ReturnCode::FileNotFound,
        &["\u{FFFD}p.vhd", "gone.vhd"],
    );
}

#[test]
fn c31_child_names_itself_as_parent() {
    let d = tmp();
    let c = child_with_only_w2ru(d.path(), "c.vhd");
    let own = Vhd::open(&c, OpenOptions::read_only()).unwrap().unique_id();
    edit_header(&c, move |h| h.parent_unique_id = own);
    set_locator_payload(&c, 0, &w2ru(".\\c.vhd"));
    chain_fails(
        &c,
        &ChainOptions::default(),
        ReturnCode::InvalidState,
        &["cycle", "c.vhd"],
    );
    let r = check_file(&c, &CheckOptions::default()).unwrap();
    assert!(r.findings.iter().any(|f| f.code == "self-parent"));
}

#[test]
fn c32_parent_given_as_a_directory() {
    let d = tmp();
    let c = child_with_only_w2ru(d.path(), "gone.vhd");
    set_locator_payload(&c, 0, &w2ru(".\\gone.vhd"));
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let o = ChainOptions::default().parent(Some(sub.clone()));
    chain_fails(
        &c,
        &o,
        ReturnCode::FileNotFound,
        &["sub", "not a regular file (a directory)"],
    );
    // A locator naming the directory.
    set_locator_payload(&c, 0, &w2ru(".\\sub"));
    chain_fails(
        &c,
        &ChainOptions::default(),
        ReturnCode::FileNotFound,
        &["a directory"],
    );
    // And opening it directly.
    let e = Vhd::open(&sub, OpenOptions::read_only()).unwrap_err();
    expect_err(
        &e,
        ReturnCode::InvalidParameter,
        &["not a regular file (a directory)"],
    );
}

#[cfg_attr(not(unix), ignore = "FIFOs (mkfifo) are Unix")]
#[test]
fn c33_parent_given_as_a_fifo() {
    let _serial = serial();
    let d = tmp();
    let c = child_with_only_w2ru(d.path(), "gone.vhd");
    set_locator_payload(&c, 0, &w2ru(".\\gone.vhd"));
    let fifo = d.path().join("pipe");
    let ok = std::process::Command::new("mkfifo").arg(&fifo).status();
    if !ok.is_ok_and(|s| s.success()) {
        eprintln!("note: mkfifo unavailable; skipping the FIFO case");
        return;
    }
    let o = ChainOptions::default().parent(Some(fifo.clone()));
    // Opening a FIFO for reading would block forever: it must be refused before that.
    chain_fails(
        &c,
        &o,
        ReturnCode::FileNotFound,
        &["pipe", "not a regular file"],
    );
    set_locator_payload(&c, 0, &w2ru(".\\pipe"));
    chain_fails(
        &c,
        &ChainOptions::default(),
        ReturnCode::FileNotFound,
        &["pipe", "not a regular file"],
    );
    let e = Vhd::open(&fifo, OpenOptions::read_only()).unwrap_err();
    expect_err(&e, ReturnCode::InvalidParameter, &["a FIFO"]);
    std::fs::remove_file(&fifo).unwrap();
}

#[cfg_attr(not(unix), ignore = "opens /dev/null and /dev/zero")]
#[test]
fn c34_parent_given_as_a_device() {
    let d = tmp();
    let c = child_with_only_w2ru(d.path(), "gone.vhd");
    set_locator_payload(&c, 0, &w2ru(".\\gone.vhd"));
    let o = ChainOptions::default().parent(Some(PathBuf::from("/dev/null")));
    chain_fails(
        &c,
        &o,
        ReturnCode::FileNotFound,
        &["/dev/null", "not a regular file"],
    );
    // A relative locator climbing to /dev/zero.
    let depth = d.path().components().count();
    let climb = format!("{}dev\\zero", "..\\".repeat(depth));
    set_locator_payload(&c, 0, &w2ru(&climb));
    chain_fails(
        &c,
        &ChainOptions::default(),
        ReturnCode::FileNotFound,
        &["zero", "not a regular file"],
    );
    for dev in ["/dev/zero", "/dev/null"] {
        let e = Vhd::open(dev, OpenOptions::read_only()).unwrap_err();
        expect_err(&e, ReturnCode::InvalidParameter, &["a device"]);
    }
}

#[test]
fn c35_missing_file() {
    let d = tmp();
    let e = Vhd::open(d.path().join("none.vhd"), OpenOptions::read_only()).unwrap_err();
    expect_err(&e, ReturnCode::FileNotFound, &["none.vhd", "cannot open"]);
    let e = check_file(d.path().join("none.vhd"), &CheckOptions::default()).unwrap_err();
    expect_err(&e, ReturnCode::FileNotFound, &["none.vhd"]);
}

// ---- Write access and space. ----

#[test]
fn c36_open_for_write_without_permission() {
    let _serial = serial();
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    truncate(&p, len_of(&p) - 512); // something for repair to do
    let Some(_guard) = unwritable(&p) else {
        eprintln!("note: this process can write a read-only file here; skipping the case");
        return;
    };
    let before = snapshot(d.path());
    let e = Vhd::open(&p, OpenOptions::writable()).unwrap_err();
    expect_err(
        &e,
        ReturnCode::AccessDenied,
        &["a.vhd", "cannot open for writing"],
    );
    let e = vhd_merge::repair::repair_file(&p, &Default::default()).unwrap_err();
    expect_err(&e, ReturnCode::AccessDenied, &["a.vhd"]);
    // Reading and checking still work.
    Vhd::open(&p, OpenOptions::read_only()).unwrap();
    check_file(&p, &CheckOptions::default()).unwrap();
    assert_eq!(snapshot(d.path()), before);
}

#[test]
fn c37_out_of_space_while_allocating() {
    let d = tmp();
    let p = dynamic(d.path(), "a.vhd");
    let before = read(&p);
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let s = FaultyStorage::new(
        Box::new(FileStorage::new(f)),
        FaultPlan::out_of_space_at(before.len() as u64),
    );
    let mut v = Vhd::from_storage(Box::new(s), &p, OpenOptions::writable()).unwrap();
    let e = v.write_at(10 * u64::from(BS), &[7; 4096]).unwrap_err();
    expect_err(&e, ReturnCode::Failed, &["No space left"]);
    drop(v);
    assert_eq!(read(&p), before);
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    assert!(!r.has_errors(), "{:#?}", r.findings);
}

// ---- Allocation bounds on crafted in-memory files. ----

/// A 1 MiB dynamic disk's bytes with the header edited by `f` (checksum fixed).
fn crafted(f: impl Fn(&mut vhd_merge::format::DynamicHeader)) -> Vec<u8> {
    let d = tmp();
    let p = d.path().join("a.vhd");
    drop(create_dynamic(&p, SIZE, &opts().block_size(BS)).unwrap());
    edit_header(&p, f);
    read(&p)
}

#[test]
fn c38_hostile_sizes_allocate_nothing_big() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("mte", crafted(|h| h.max_table_entries = u32::MAX)),
        ("mte-ish", crafted(|h| h.max_table_entries = 0x4000_0001)),
        ("block size", crafted(|h| h.block_size = 1 << 31)),
        (
            "block size max",
            crafted(|h| {
                h.block_size = 32 << 20;
            }),
        ),
        (
            "locator",
            crafted(|h| {
                h.locators[0].platform_code = PlatformCode::W2ru;
                h.locators[0].data_length = u32::MAX;
                h.locators[0].data_space = u32::MAX;
                h.locators[0].data_offset = u64::MAX - 10;
            }),
        ),
    ];
    for (name, bytes) in cases {
        let len = bytes.len();
        for lenient in [false, true] {
            let (r, peak) = peak_of(|| {
                let s = Box::new(MemStorage::new(bytes.clone()));
                let o = OpenOptions::read_only().lenient(lenient);
                Vhd::from_storage(s, "x.vhd", o).map(|v| v.allocated_blocks())
            });
            // The storage itself holds a copy of the file.
            assert!(
                peak <= 2 * len + SLACK,
                "{name}: {peak} bytes for a {len}-byte file ({r:?})"
            );
        }
        let (_, peak) = peak_of(|| {
            let s = Box::new(MemStorage::new(bytes.clone()));
            let deep = CheckOptions::default().deep(true);
            vhd_merge::check::check_storage(s, "x.vhd", &deep)
        });
        assert!(peak <= 2 * len + SLACK, "{name}: check took {peak} bytes");
    }
}

/// The counting allocator sees allocations (so the bounds above are not vacuous).
#[test]
fn counting_allocator_counts() {
    let (v, peak) = peak_of(|| vec![1u8; 10 << 20]);
    assert!(peak >= 10 << 20, "{peak}");
    drop(v);
    // Opening a real file reads its BAT a 1 MiB piece at a time and keeps nothing per entry
    // (only the allocated entries' indices: none here): of the 4 MiB table (1,044,480
    // entries) the piece shows up, not the table.
    let d = tmp();
    let p = d.path().join("big.vhd");
    drop(create_dynamic(&p, 2040 << 30, &opts().block_size(2 << 20)).unwrap());
    let (r, peak) = peak_of(|| Vhd::open(&p, OpenOptions::read_only()));
    r.unwrap();
    assert!((1 << 20..(1 << 20) + (64 << 10)).contains(&peak), "{peak}");
}

// ---- Merging. ----

use vhd_merge::merge::{MergeOptions, merge};

/// Every file under `dirs`, with content.
fn snapshot_all(dirs: &[&Path]) -> Vec<(PathBuf, Vec<u8>)> {
    dirs.iter().flat_map(|d| snapshot(d)).collect()
}

/// Total size of the files in `dirs`.
fn bytes_in(dirs: &[&Path]) -> usize {
    snapshot_all(dirs).iter().map(|(_, b)| b.len()).sum()
}

/// Merging `src` into `dest` (the parent when `None`) fails with `rc` and `words`, a dry
/// run fails the same way unless `dry_ok`, no byte of any file in `dirs` changes, and the
/// merge allocates no more than the files' size justifies.
fn merge_fails(
    src: &Path,
    dest: Option<&Path>,
    dirs: &[&Path],
    rc: ReturnCode,
    words: &[&str],
    dry_ok: bool,
) -> Error {
    let before = snapshot_all(dirs);
    let bound = bytes_in(dirs) + 2 * SLACK;
    let (r, peak) = peak_of(|| merge(src, dest, &MergeOptions::default()));
    let e = r.expect_err("merged");
    expect_err(&e, rc, words);
    assert!(
        peak <= bound,
        "merge allocated {peak} bytes (bound {bound})"
    );
    let dry = MergeOptions::default().dry_run(true);
    match merge(src, dest, &dry) {
        Ok(_) => assert!(dry_ok, "the dry run succeeded"),
        Err(e) => expect_err(&e, rc, words),
    }
    assert_eq!(snapshot_all(dirs), before, "a file changed");
    e
}

/// A 1 MiB dynamic parent with blocks 0, 1, 5, and a child writing into block 3 and 9
/// (unallocated in the parent: merging allocates) and block 0 (in place).
fn merge_pair(d: &Path) -> (PathBuf, PathBuf) {
    let base = dynamic(d, "base.vhd");
    let c = d.join("c.vhd");
    let mut v = vhd_merge::create::create_differencing(&c, &base, &opts()).unwrap();
    v.write_at(3 * u64::from(BS) + 512, &[0x33; 4096]).unwrap();
    v.write_at(9 * u64::from(BS), &[0x99; 1024]).unwrap();
    v.write_at(1024, &[0x10; 512]).unwrap();
    (base, c)
}

#[test]
fn c40_merge_into_a_read_only_destination() {
    let _serial = serial();
    let d = tmp();
    let (base, c) = merge_pair(d.path());
    let Some(_guard) = unwritable(&base) else {
        eprintln!("note: this process can write a read-only file here; skipping the merge");
        return;
    };
    merge_fails(
        &c,
        None,
        &[d.path()],
        ReturnCode::AccessDenied,
        &["base.vhd", "cannot open for writing"],
        true,
    );
    // Naming the destination explicitly, and two levels up, says the same.
    let c2 = d.path().join("c2.vhd");
    let mut v = vhd_merge::create::create_differencing(&c2, &c, &opts()).unwrap();
    v.write_at(0, &[1; 512]).unwrap();
    drop(v);
    merge_fails(
        &c2,
        Some(&base),
        &[d.path()],
        ReturnCode::AccessDenied,
        &["base.vhd", "cannot open for writing"],
        true,
    );
}

/// A full disk through the fault layer: the first growth of the destination fails. The
/// merge allocates its blocks before writing any (reserve first), so nothing lands.
#[test]
fn c41_merge_into_a_full_disk() {
    let _serial = serial();
    let d = tmp();
    let (base, c) = merge_pair(d.path());
    let before = snapshot(d.path());
    let plan = FaultPlan::out_of_space_at(len_of(&base));
    let p2 = plan.clone();
    let o = MergeOptions::default().destination_io(Some(std::sync::Arc::new(move |s| {
        Box::new(FaultyStorage::new(s, p2.clone()))
    })));
    let bound = bytes_in(&[d.path()]) + 2 * SLACK;
    let (r, peak) = peak_of(|| merge(&c, None, &o));
    let e = r.expect_err("merged into a full disk");
    expect_err(
        &e,
        ReturnCode::Failed,
        &["base.vhd", "No space left on device"],
    );
    assert!(peak <= bound, "merge allocated {peak} bytes");
    assert_eq!(snapshot(d.path()), before, "a file changed");
    let r = check_file(&base, &CheckOptions::default()).unwrap();
    assert!(!r.has_errors(), "{:#?}", r.findings);
    // With room, the same merge completes.
    merge(&c, None, &MergeOptions::default()).unwrap();
}

/// The same on a real full file system (a tmpfs filled to the last page), when this runs as
/// root; the OS's own error text reaches the message.
#[cfg_attr(not(target_os = "linux"), ignore = "mounts a tmpfs (Linux)")]
#[test]
fn c41b_merge_into_a_really_full_tmpfs() {
    let _serial = serial();
    let mnt = tmp();
    let Some(_mount) = Mount::tmpfs(mnt.path(), 4 << 20) else {
        eprintln!(
            "note: cannot mount a tmpfs (not root?); c41 covers a full disk through the fault layer"
        );
        return;
    };
    let (base, c) = merge_pair(mnt.path());
    // Fill what is left.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(mnt.path().join("filler")).unwrap();
        let chunk = vec![0xEEu8; 4096];
        while f.write_all(&chunk).is_ok() {}
    }
    let before = snapshot(mnt.path());
    let bound = bytes_in(&[mnt.path()]) + 2 * SLACK;
    let (r, peak) = peak_of(|| merge(&c, None, &MergeOptions::default()));
    let e = r.expect_err("merged into a full file system");
    expect_err(
        &e,
        ReturnCode::Failed,
        &["base.vhd", "No space left on device (os error 28)"],
    );
    assert!(peak <= bound, "merge allocated {peak} bytes");
    assert_eq!(snapshot(mnt.path()), before, "a file changed");
    Vhd::open(&base, OpenOptions::read_only()).unwrap();
    let r = check_file(&base, &CheckOptions::default()).unwrap();
    assert!(!r.has_errors(), "{:#?}", r.findings);
    std::fs::remove_file(mnt.path().join("filler")).unwrap();
    merge(&c, None, &MergeOptions::default()).unwrap();
}

/// Damage in the child stops the merge before anything is written: bad checksums, a BAT past
/// the end of the file, overlapping blocks, a hostile table size.
#[test]
fn c42_merging_a_damaged_child() {
    let _serial = serial();
    type Damage = (&'static str, fn(&Path), &'static [&'static str]);
    let cases: [Damage; 6] = [
        (
            // Both copies: with only the end footer damaged the copy at offset 0 is used.
            "footer checksum",
            |c| {
                patch(c, len_of(c) - 512 + 64, &[0, 0, 0, 1]);
                patch(c, 64, &[0, 0, 0, 1]);
            },
            &["footer checksum mismatch"],
        ),
        (
            "header checksum",
            |c| patch(c, header_offset(c) + 36, &[0, 0, 0, 1]),
            &["dynamic header checksum mismatch"],
        ),
        (
            "BAT past end of file",
            |c| {
                let len = len_of(c);
                edit_header(c, |h| h.table_offset = len + 4096);
            },
            &["BAT at offset", "past the end of the file"],
        ),
        (
            "overlapping blocks",
            |c| set_bat_entry(c, 9, bat_entry(c, 3) + 16),
            &["overlaps block"],
        ),
        (
            "block past end of file",
            |c| set_bat_entry(c, 9, (len_of(c) / 512 + 64) as u32),
            &["BAT entry 9", "past the end"],
        ),
        (
            "huge Max Table Entries",
            |c| edit_header(c, |h| h.max_table_entries = u32::MAX),
            &["4294967295 entries"],
        ),
    ];
    for (what, damage, words) in cases {
        let d = tmp();
        let (_, c) = merge_pair(d.path());
        damage(&c);
        eprintln!("c42: {what}");
        let e = merge_fails(
            &c,
            None,
            &[d.path()],
            ReturnCode::IncorrectDataType,
            words,
            false,
        );
        assert!(e.to_string().contains("c.vhd"), "{what}: {e}");
    }
}

/// Damage in the destination or an intermediate stops the merge too. Those files are found
/// as parents whose unique id matches but which do not open: Incorrect data type (32776),
/// naming the damaged file, what is wrong with it, and whose parent it is.
#[test]
fn c43_merging_into_a_damaged_destination() {
    let _serial = serial();
    let d = tmp();
    let (base, c) = merge_pair(d.path());
    set_bat_entry(&base, 9, bat_entry(&base, 1) + 16);
    merge_fails(
        &c,
        None,
        &[d.path()],
        ReturnCode::IncorrectDataType,
        &[
            "base.vhd",
            "overlaps block 9",
            "is the parent of",
            "damaged",
        ],
        false,
    );
    let d = tmp();
    let (base, c) = merge_pair(d.path());
    let c2 = d.path().join("c2.vhd");
    drop(vhd_merge::create::create_differencing(&c2, &c, &opts()).unwrap());
    patch(&c, len_of(&c) - 512 + 64, &[0, 0, 0, 1]);
    patch(&c, 64, &[0, 0, 0, 1]);
    merge_fails(
        &c2,
        Some(&base),
        &[d.path()],
        ReturnCode::IncorrectDataType,
        &["c.vhd", "footer checksum mismatch", "is the parent of"],
        false,
    );
}

#[test]
fn c44_wrong_source_or_destination() {
    let _serial = serial();
    let d = tmp();
    let (base, c) = merge_pair(d.path());
    // A dynamic source.
    merge_fails(
        &base,
        None,
        &[d.path()],
        ReturnCode::InvalidParameter,
        &["base.vhd", "dynamic disk", "only a differencing disk"],
        false,
    );
    // A fixed source.
    let f = fixed(d.path(), "f.vhd");
    merge_fails(
        &f,
        None,
        &[d.path()],
        ReturnCode::InvalidParameter,
        &["f.vhd", "fixed disk"],
        false,
    );
    // A destination that is not an ancestor: an unrelated disk, the source itself, a child
    // of the source, a file that is not a VHD.
    let other = dynamic(d.path(), "other.vhd");
    merge_fails(
        &c,
        Some(&other),
        &[d.path()],
        ReturnCode::InvalidParameter,
        &["other.vhd", "not an ancestor of", "base.vhd"],
        false,
    );
    merge_fails(
        &c,
        Some(&c),
        &[d.path()],
        ReturnCode::InvalidParameter,
        &["the source itself"],
        false,
    );
    let text = d.path().join("notes.txt");
    std::fs::write(&text, b"hello").unwrap();
    merge_fails(
        &c,
        Some(&text),
        &[d.path()],
        ReturnCode::InvalidParameter,
        &["notes.txt", "not a readable VHD"],
        false,
    );
    // A copy of the parent (same unique id, another file).
    let copy = d.path().join("copy.vhd");
    std::fs::copy(&base, &copy).unwrap();
    merge_fails(
        &c,
        Some(&copy),
        &[d.path()],
        ReturnCode::InvalidParameter,
        &["copy.vhd", "a copy?"],
        false,
    );
}

#[test]
fn c45_a_sibling_in_the_way() {
    let _serial = serial();
    let d = tmp();
    let (base, c) = merge_pair(d.path());
    let sib = d.path().join("sibling.vhd");
    drop(vhd_merge::create::create_differencing(&sib, &base, &opts()).unwrap());
    merge_fails(
        &c,
        None,
        &[d.path()],
        ReturnCode::InvalidState,
        &["sibling.vhd", "would be corrupted", "--force"],
        true,
    );
}

#[test]
fn c46_missing_parent_in_the_middle_of_the_chain() {
    let _serial = serial();
    let d = tmp();
    let (base, c) = merge_pair(d.path());
    let c2 = d.path().join("c2.vhd");
    let mut v = vhd_merge::create::create_differencing(&c2, &c, &opts()).unwrap();
    v.write_at(0, &[7; 512]).unwrap();
    drop(v);
    // The grandparent disappears: merging c2 into c needs the whole chain.
    let away = tmp();
    std::fs::rename(&base, away.path().join("base.vhd")).unwrap();
    merge_fails(
        &c2,
        None,
        &[d.path(), away.path()],
        ReturnCode::FileNotFound,
        &["c.vhd", "parent \"base.vhd\"", "not found"],
        false,
    );
    merge_fails(
        &c2,
        Some(&c),
        &[d.path(), away.path()],
        ReturnCode::FileNotFound,
        &["parent \"base.vhd\"", "not found"],
        false,
    );
}

/// A merge's memory does not grow with the virtual size: merging into a 64 GiB dynamic disk
/// allocates a few unit buffers and the block tables, whatever the size (all threads counted).
#[test]
fn c47_merge_memory_is_bounded_by_units_and_tables() {
    let _serial = serial();
    let d = tmp();
    let base = d.path().join("big.vhd");
    let gib = 1u64 << 30;
    let o = |bs: u32| opts().block_size(bs);
    let mut v = create_dynamic(&base, 64 * gib, &o(2 << 20)).unwrap();
    v.write_at(5 * gib, &[1; 4096]).unwrap();
    drop(v);
    let c = d.path().join("c.vhd");
    let mut v = vhd_merge::create::create_differencing(&c, &base, &o(512 << 10)).unwrap();
    for k in 0..64u64 {
        // Scattered partial blocks over the whole virtual size, and a few full ones.
        let at = k * (gib - (7 << 20)) + (k % 5) * 4096;
        let len = if k % 9 == 0 { 512 << 10 } else { 3 * 512 };
        v.write_at(at - at % 512, &vec![k as u8 + 1; len]).unwrap();
    }
    drop(v);
    // The tables: 64 GiB in 2 MiB blocks (128 KiB of BAT) and 512 KiB blocks (512 KiB).
    let tables = (64 * gib / (2 << 20) + 64 * gib / (512 << 10)) as usize * 4;
    let opts = MergeOptions::default().verify(true);
    let (r, peak) = peak_all_of(|| merge(&c, None, &opts));
    let r = r.unwrap();
    assert!(r.bytes_merged > 0);
    // Four 2 MiB unit buffers in flight, a scratch block, and a few copies of each table.
    let bound = 6 * (2 << 20) + 6 * tables + 2 * SLACK;
    eprintln!("c47: merging into a 64 GiB disk allocated at most {peak} bytes (bound {bound})");
    assert!(
        peak <= bound,
        "merge allocated {peak} bytes (bound {bound})"
    );
    let chain = Chain::open(&base, &ChainOptions::default()).unwrap();
    let mut b = vec![0u8; 512];
    chain
        .read_at(0, 63 * (gib - (7 << 20)) + 3 * 4096, &mut b)
        .unwrap();
    assert_eq!(b, vec![64u8; 512]);
}

// ---- Block tables past MAX_TABLE_ENTRIES (issue 9, defect 3). ----

use vhd_merge::image::{MAX_HELD_BLOCKS, MAX_TABLE_ENTRIES};

/// A dynamic disk whose header claims `mte` BAT entries, in a (sparse) file long enough to
/// hold that table, with every entry unallocated: what another tool could write.
fn table_of(dir: &Path, mte: u32) -> PathBuf {
    let p = dir.join(format!("mte-{mte}.vhd"));
    drop(create_dynamic(&p, SIZE, &opts()).unwrap());
    edit_header(&p, |h| h.max_table_entries = mte);
    let front = read(&p)[..1536].to_vec(); // footer copy and header
    let end = 1536 + vhd_merge::format::bat::table_bytes(mte);
    truncate(&p, 1536);
    patch(&p, end, &front[..512]);
    p
}

/// The length, the first 2 KiB and the last 512 bytes of a file too large to read whole (the
/// only bytes of [`table_of`]'s files that are not a hole).
fn ends_of(p: &Path) -> (u64, Vec<u8>, Vec<u8>) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len();
    let (mut head, mut tail) = (vec![0u8; 2048], vec![0u8; 512]);
    f.read_exact(&mut head).unwrap();
    f.seek(SeekFrom::Start(len - 512)).unwrap();
    f.read_exact(&mut tail).unwrap();
    (len, head, tail)
}

/// One way of opening a file, for a table of them.
type Op<'a> = Box<dyn Fn() -> vhd_merge::Result<()> + 'a>;

/// Issue 9, defect 3: a table of more than MAX_TABLE_ENTRIES entries (up to the 16 GiB of
/// u32::MAX entries) is refused with Not Supported (32770) by every way of opening it, without
/// allocating it, and nothing is written.
#[test]
fn block_tables_past_the_limit_are_refused_without_allocating() {
    use vhd_merge::flatten::{FlattenOptions, flatten_path};
    use vhd_merge::repair::{RepairOptions, repair_file};
    let _serial = serial();
    let d = tmp();
    for mte in [MAX_TABLE_ENTRIES + 1, u32::MAX] {
        let p = table_of(d.path(), mte);
        let before = ends_of(&p);
        let out = d.path().join("flat.vhd");
        let ops: Vec<(&str, Op)> = vec![
            (
                "open",
                Box::new(|| Vhd::open(&p, OpenOptions::read_only()).map(drop)),
            ),
            (
                "open rw",
                Box::new(|| Vhd::open(&p, OpenOptions::writable()).map(drop)),
            ),
            (
                "chain",
                Box::new(|| Chain::open(&p, &ChainOptions::default()).map(drop)),
            ),
            (
                "repair",
                Box::new(|| repair_file(&p, &RepairOptions::default()).map(drop)),
            ),
            (
                "flatten",
                Box::new(|| {
                    let o = FlattenOptions::default();
                    flatten_path(&p, &ChainOptions::default(), &out, o).map(drop)
                }),
            ),
        ];
        for (name, op) in ops {
            let (r, peak) = peak_of(op);
            let e = r.unwrap_err();
            expect_err(
                &e,
                ReturnCode::NotSupported,
                &["Max Table Entries", "supported"],
            );
            assert!(peak <= SLACK, "{name} of mte {mte}: {peak} bytes");
        }
        let (r, peak) = peak_of(|| check_file(&p, &CheckOptions::default()));
        let r = r.unwrap();
        assert!(
            r.has_errors() && r.with_code("bat-too-large").count() == 1,
            "{r:?}"
        );
        assert!(peak <= SLACK, "check of mte {mte}: {peak} bytes");
        assert_eq!(ends_of(&p), before);
        assert!(!out.exists());
        #[cfg(feature = "cli")]
        for args in [
            &["info"][..],
            &["check"],
            &["repair"],
            &["chain"],
            &["flatten"],
        ] {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_vhd-merge"));
            c.args(args).arg(&p);
            if args[0] == "flatten" {
                c.arg(&out);
            }
            let o = c.output().unwrap();
            let (stdout, stderr) = (
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
            );
            if args[0] == "check" {
                assert_eq!(o.status.code(), Some(2), "{args:?}: {stdout}{stderr}");
                assert!(stdout.contains("Max Table Entries"), "{stdout}");
            } else {
                assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
                assert!(
                    stderr.starts_with("error 32770 (Not Supported)"),
                    "{args:?}: {stderr}"
                );
                assert!(stderr.contains("Max Table Entries"), "{stderr}");
            }
        }
        assert_eq!(ends_of(&p), before);
        std::fs::remove_file(&p).unwrap();
    }
}

/// Issue 10 item 3: `create` makes tables past the old 2^22-entry limit with bounded memory
/// (the table is written from one shared piece; it used to be built whole, and before that
/// creation aborted allocating 16 GiB): a 4 GiB disk at 512-byte blocks (8 Mi entries, a 32
/// MiB table) is created, opened and checked with little allocated at once; the 2040 GiB
/// disks at 512 KiB (as Windows' CreateVirtualDisk makes) and 2 MiB blocks still open clean.
/// The 2040 GiB disk at 512-byte blocks (a 16 GiB table) is the bench's `bigbat` row.
#[test]
fn create_makes_tables_past_the_old_limit_in_bounded_memory() {
    // Serial: it creates and opens large tables, which would count in the whole-process
    // peaks of the memory tests running beside it (c47 failed that way).
    let _serial = serial();
    let d = tmp();
    let p = d.path().join("big.vhd");
    let o = opts().block_size(512);
    let (r, peak) = peak_of(|| create_dynamic(&p, 4 << 30, &o).map(drop));
    r.unwrap();
    assert!(peak <= 2 * SLACK, "create: {peak}");
    let (v, peak) = peak_of(|| Vhd::open(&p, OpenOptions::read_only()).unwrap());
    assert!(peak <= 2 * SLACK, "open: {peak}");
    assert_eq!(v.header().unwrap().max_table_entries, 8 << 20);
    assert_eq!(v.allocated_blocks(), 0);
    assert_eq!(v.block_offset((8 << 20) - 1).unwrap(), None);
    drop(v);
    let (r, peak) = peak_of(|| check_file(&p, &CheckOptions::default()).unwrap());
    assert!(!r.has_errors(), "{:?}", r.findings.first());
    assert!(peak <= 2 * SLACK, "check: {peak}");
    #[cfg(feature = "cli")]
    {
        std::fs::remove_file(&p).unwrap();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_vhd-merge"))
            .args(["create", "dynamic"])
            .arg(&p)
            .args(["--size", "4G", "--block-size", "512"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            Vhd::open(&p, OpenOptions::read_only())
                .unwrap()
                .block_size(),
            512
        );
    }
    for bs in [2u32 << 20, 512 << 10] {
        let o = opts().block_size(bs).overwrite(true);
        drop(create_dynamic(&p, 2040 << 30, &o).unwrap());
        let v = Vhd::open(&p, OpenOptions::read_only()).unwrap();
        assert_eq!(v.block_count(), (2040u64 << 30) / u64::from(bs));
        let r = check_file(&p, &CheckOptions::default()).unwrap();
        assert!(!r.has_errors(), "{:?}", r.findings.first());
    }
}

/// A dynamic disk of `n` blocks of 512 bytes, the first `allocated` of them allocated: block
/// i at sector first + 2i, a one-sector bitmap (a hole: nothing written) and its sector of
/// data.
fn fully_allocated(p: &Path, n: u64, allocated: u64) {
    let o = opts().block_size(512);
    drop(create_dynamic(p, n * 512, &o).unwrap());
    let front = read(p)[..1536].to_vec();
    let first = (1536 + n * 4).div_ceil(512);
    let table: Vec<u8> = (0..n)
        .flat_map(|i| match i < allocated {
            true => u32::try_from(first + 2 * i).unwrap().to_be_bytes(),
            false => [0xFF; 4],
        })
        .collect();
    truncate(p, 0);
    patch(p, 0, &front);
    patch(p, 1536, &table);
    patch(p, (first + 2 * allocated) * 512, &front[..512]);
}

/// Issue 9, defect 3 and issue 10 item 3: the most allocated blocks held (MAX_HELD_BLOCKS =
/// 2^22 at 512-byte blocks, a 4 GiB sparse file), every entry allocated, is opened, checked
/// (deeply), repaired (dry run, which checks deeply too) and opened as a chain with less than
/// 64 MiB allocated at once; opening costs at most 13 bytes per entry (4 bytes per allocated
/// index, 8 bytes per block in the overlap sweep) plus 2 MiB. One more allocated block (written
/// by a write session) is no longer refused: the file opens, checks and reads back, still
/// under 64 MiB.
#[test]
fn the_largest_accepted_table_fits_in_bounded_memory() {
    let _serial = serial();
    let d = tmp();
    let p = d.path().join("full.vhd");
    let n = MAX_HELD_BLOCKS as u64;
    fully_allocated(&p, n, n);
    const BOUND: usize = 64 << 20;
    let deep = CheckOptions::default().deep(true);
    assert_eq!(n, 1 << 22);
    let per_entry = 13 * n as usize + 2 * SLACK;
    let (v, peak) = peak_of(|| Vhd::open(&p, OpenOptions::read_only()).unwrap());
    assert_eq!(v.allocated_blocks() as u64, n);
    drop(v);
    eprintln!("open of {n} allocated entries: {peak} bytes at peak");
    assert!(peak < BOUND && peak <= per_entry, "open: {peak}");
    let (_, peak) = peak_of(|| Vhd::open(&p, OpenOptions::writable()).unwrap());
    eprintln!("open rw: {peak} bytes at peak");
    assert!(peak < BOUND && peak <= per_entry, "open rw: {peak}");
    let (r, peak) = peak_of(|| check_file(&p, &deep).unwrap());
    assert!(!r.has_errors(), "{:?}", r.findings.first());
    eprintln!("check --deep: {peak} bytes at peak");
    assert!(peak < BOUND, "check --deep: {peak}");
    let dry = vhd_merge::repair::RepairOptions::default().dry_run(true);
    let (r, peak) = peak_of(|| vhd_merge::repair::repair_file(&p, &dry).unwrap());
    assert!(r.is_clean() && !r.has_errors());
    eprintln!("repair --dry-run: {peak} bytes at peak");
    assert!(peak < BOUND, "repair: {peak}");
    let (_, peak) = peak_of(|| Chain::open(&p, &ChainOptions::default()).unwrap());
    eprintln!("chain: {peak} bytes at peak");
    assert!(peak < BOUND, "chain: {peak}");
    // Past the held bound: a write session allocates past it, and the file opens (the
    // windowed sweep, the table read on demand), checks and reads back in bounded memory.
    let p = d.path().join("last.vhd");
    fully_allocated(&p, n + 1, n);
    let mut v = Vhd::open(&p, OpenOptions::writable()).unwrap();
    v.write_at(n * 512, &[3; 512]).unwrap();
    v.finish().unwrap();
    drop(v);
    let (v, peak) = peak_of(|| Vhd::open(&p, OpenOptions::read_only()).unwrap());
    eprintln!("open of {} allocated entries: {peak} bytes at peak", n + 1);
    assert!(peak < BOUND, "open past the bound: {peak}");
    assert_eq!(
        (v.allocated_blocks() as u64, v.is_allocated(n).unwrap()),
        (n + 1, true)
    );
    let mut b = vec![0u8; 512];
    v.read_own(n * 512, &mut b).unwrap();
    assert_eq!(b, vec![3u8; 512]);
    drop(v);
    let (r, peak) = peak_of(|| check_file(&p, &deep).unwrap());
    assert!(!r.has_errors(), "{:?}", r.findings.first());
    eprintln!("check --deep past the bound: {peak} bytes at peak");
    assert!(peak < BOUND, "check --deep past the bound: {peak}");
    let (_, peak) = peak_of(|| Chain::open(&p, &ChainOptions::default()).unwrap());
    eprintln!("chain past the bound: {peak} bytes at peak");
    assert!(peak < BOUND, "chain past the bound: {peak}");
}

/// Issue 10 item 3: the block table is read on demand and nothing is kept per entry. A table
/// of 2^24 entries (64 MiB, four times the old limit, every entry unallocated) is opened,
/// looked up at its last entry, written (a new block, its BAT sector committed) and reopened
/// with at most 2 MiB allocated at once: the cached pages and a streamed piece, not the table
/// nor a bit per entry (2 MiB here).
#[test]
fn a_large_table_is_read_on_demand() {
    let _serial = serial();
    let d = tmp();
    let entries: u32 = 1 << 24;
    let p = table_of(d.path(), entries);
    let table = entries as usize * 4;
    for at in (0..table).step_by(1 << 20) {
        patch(&p, 1536 + at as u64, &vec![0xFF; 1 << 20]);
    }
    let bound = 2 * SLACK;
    let last = u64::from(entries) - 1;
    let (v, peak) = peak_of(|| Vhd::open(&p, OpenOptions::read_only()).unwrap());
    eprintln!("open: {peak} bytes at peak");
    assert!(peak < bound, "open: {peak}");
    assert_eq!(v.allocated_blocks(), 0);
    assert_eq!(v.block_offset(last).unwrap(), None);
    drop(v);
    let (mut v, peak) = peak_of(|| Vhd::open(&p, OpenOptions::writable()).unwrap());
    assert!(peak < bound, "open rw: {peak}");
    let (r, peak) = peak_of(|| {
        v.write_at(512, &[9; 512])?;
        v.finish()
    });
    r.unwrap();
    assert!(peak < bound, "write and finish: {peak}");
    drop(v);
    let v = Vhd::open(&p, OpenOptions::read_only()).unwrap();
    assert!(v.is_allocated(0).unwrap() && !v.is_allocated(1).unwrap());
    assert_eq!(v.allocated_blocks(), 1);
    let at = v.block_offset(0).unwrap().expect("block 0 allocated");
    assert!(at >= 1536 + u64::from(entries) * 4, "after the table: {at}");
    let mut b = vec![0u8; 1024];
    v.read_own(0, &mut b).unwrap();
    assert_eq!(
        (b[..512].to_vec(), b[512..].to_vec()),
        (vec![0; 512], vec![9; 512])
    );
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    assert!(!r.has_errors(), "{:?}", r.findings.first());
}

/// Issue 9, defect 3 (every allocation driven by file contents bounded): set-parent reuses an
/// old locator's extent, whose Data Space (up to 4 GiB) comes from the file; it used to pad
/// the new payload to the whole extent in memory.
#[test]
fn set_parent_into_a_huge_locator_extent_allocates_little() {
    use vhd_merge::create::create_differencing;
    use vhd_merge::setparent::{SetParentOptions, set_parent};
    let _serial = serial();
    let d = tmp();
    let base = dynamic(d.path(), "base.vhd");
    let c = d.path().join("c.vhd");
    drop(create_differencing(&c, &base, &opts()).unwrap());
    let h = header(&c);
    let slot = h.locators.iter().rposition(|l| !l.is_empty()).unwrap();
    let at = h.locators[slot].data_offset;
    let space: u32 = 3 << 30;
    edit_header(&c, |h| h.locators[slot].data_space = space);
    let footer = read(&c)[..512].to_vec();
    truncate(&c, at);
    patch(&c, at + u64::from(space), &footer);
    let (r, peak) = peak_of(|| set_parent(&c, &base, &SetParentOptions::default()));
    let r = r.unwrap();
    assert!(
        r.locators.iter().any(|l| l.reused && l.offset == at),
        "{r:?}"
    );
    assert!(peak <= 4 * SLACK, "set-parent allocated {peak} bytes");
    Chain::open(&c, &ChainOptions::default()).unwrap();
}

/// Issue 10 item 3: a table with more allocated blocks than one overlap sweep holds is
/// validated in windows. With bounds small enough that windows split (one block each: every
/// overlap then spans a window edge; 64 blocks with buckets refined; 64 blocks with the
/// default buckets), the damaged file (a block starting inside the one before it, two blocks
/// at one start, a block over the BAT, one past the end of data) gets the findings of the
/// held sweep, and its repair writes the same bytes; the clean file opens, checks deeply
/// without errors and reads what was written (through the chain).
#[test]
fn more_blocks_than_a_sweep_holds_are_validated_in_windows() {
    use vhd_merge::image::set_test_bounds;
    let d = tmp();
    let n = 300u64;
    let clean = d.path().join("clean.vhd");
    fully_allocated(&clean, n, n);
    for i in 0..n {
        let at = u64::from(bat_entry(&clean, i)) * 512;
        patch(&clean, at, &[0x80]);
        patch(&clean, at + 512, &[i as u8 ^ 0x5A; 512]);
    }
    let want: Vec<u8> = (0..n).flat_map(|i| [i as u8 ^ 0x5A; 512]).collect();
    let bad = d.path().join("bad.vhd");
    std::fs::copy(&clean, &bad).unwrap();
    let e = |i| bat_entry(&clean, i);
    set_bat_entry(&bad, 100, e(99) + 1);
    set_bat_entry(&bad, 200, e(150));
    set_bat_entry(&bad, 250, 3);
    set_bat_entry(&bad, 260, e(n - 1) + 100);
    let deep = CheckOptions::default().deep(true);
    let held = check_file(&bad, &deep).unwrap();
    let has = |words: &[&str]| {
        held.findings
            .iter()
            .any(|f| words.iter().all(|w| f.message.contains(w)))
    };
    assert!(has(&["block 99 (offset", "overlaps block 100"]), "{held:?}");
    assert!(
        has(&["block 150 (offset", "overlaps block 200"]),
        "{held:?}"
    );
    assert!(has(&["block 250 (offset", "overlaps the BAT"]), "{held:?}");
    assert!(has(&["BAT entry 260", "past the end of data"]), "{held:?}");
    let repaired = |bounds| {
        let p = d.path().join("repaired.vhd");
        std::fs::copy(&bad, &p).unwrap();
        set_test_bounds(bounds);
        let r = vhd_merge::repair::repair_file(&p, &Default::default()).unwrap();
        set_test_bounds(None);
        (format!("{r:?}"), read(&p))
    };
    let held_repair = repaired(None);
    for bounds in [(1, 2), (64, 4), (64, 1 << 16)] {
        set_test_bounds(Some(bounds));
        let r = check_file(&bad, &deep).unwrap();
        let c = check_file(&clean, &deep).unwrap();
        let v = Vhd::open(&clean, OpenOptions::read_only()).unwrap();
        let view = common::read_view(&clean);
        set_test_bounds(None);
        assert_eq!(format!("{:?}", r.findings), format!("{:?}", held.findings));
        assert!(!c.has_errors(), "{bounds:?}: {:?}", c.findings.first());
        assert_eq!(v.allocated_blocks() as u64, n);
        assert!(view == want, "{bounds:?}: the clean file reads back");
        assert!(repaired(Some(bounds)) == held_repair, "{bounds:?}: repair");
    }
}

/// Issue 10 item 3: a merge into a parent with more allocated blocks than the held bound (the
/// test bound 1: its table read on demand, its sweep windowed) overwrites allocated blocks and
/// allocates new ones; the merged file reads the model and checks deeply without errors.
#[test]
fn a_merge_into_a_table_past_the_held_bound() {
    use vhd_merge::image::set_test_bounds;
    let d = tmp();
    let (n, allocated) = (350u64, 300u64);
    let base = d.path().join("base.vhd");
    fully_allocated(&base, n, allocated);
    let child = d.path().join("child.vhd");
    let o = opts().block_size(512);
    let mut c = vhd_merge::create::create_differencing(&child, &base, &o).unwrap();
    let mut model = vec![0u8; (n * 512) as usize];
    for b in [0u64, 5, 150, 299, 300, 320, 349] {
        let fill = [b as u8 ^ 0xA5; 512];
        c.write_at(b * 512, &fill).unwrap();
        model[(b * 512) as usize..][..512].copy_from_slice(&fill);
    }
    c.finish().unwrap();
    drop(c);
    set_test_bounds(Some((1, 2)));
    let r = vhd_merge::merge(&child, None, &Default::default());
    let view = common::read_view(&base);
    let v = Vhd::open(&base, OpenOptions::read_only()).unwrap();
    let report = check_file(&base, &CheckOptions::default().deep(true)).unwrap();
    set_test_bounds(None);
    let r = r.unwrap();
    assert_eq!(r.blocks_allocated, 3, "{r:?}");
    assert!(view == model, "the merged parent reads the model");
    assert_eq!(v.allocated_blocks() as u64, allocated + 3);
    assert!(!report.has_errors(), "{:?}", report.findings.first());
}

/// Issue 10 item 3: past the held bound the blocks to drop are bounded too. A table of
/// 2^22 + 2 entries all pointing at one block: a strict open stops at the first overlap, and
/// `check` (which collects every problem) stops validation past 2^20 overlaps, each with less
/// than 64 MiB allocated at once.
#[test]
fn every_entry_equal_past_the_held_bound_stops_in_bounded_memory() {
    let _serial = serial();
    let d = tmp();
    let p = d.path().join("equal.vhd");
    let n = MAX_HELD_BLOCKS as u64 + 2;
    fully_allocated(&p, n, 1);
    let first = bat_entry(&p, 0);
    let table: Vec<u8> = (0..n).flat_map(|_| first.to_be_bytes()).collect();
    patch(&p, 1536, &table);
    let (r, peak) = peak_of(|| Vhd::open(&p, OpenOptions::read_only()).map(drop));
    eprintln!("refused open: {peak} bytes at peak");
    expect_err(
        &r.unwrap_err(),
        ReturnCode::IncorrectDataType,
        &["block 0 (offset", "overlaps block 1"],
    );
    assert!(peak < 64 << 20, "refused open: {peak}");
    let (r, peak) = peak_of(|| check_file(&p, &CheckOptions::default()).unwrap());
    eprintln!("check: {peak} bytes at peak");
    let stop = "more than 1048576 allocated blocks lie in an overlap";
    assert!(
        r.findings.iter().any(|f| f.message.contains(stop)),
        "{:?}",
        r.findings.last()
    );
    assert!(peak < 64 << 20, "check: {peak}");
}
