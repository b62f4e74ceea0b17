//! Real VHDs written by other tools: every file of the shared fixture table opens with the type,
//! size and allocation its provenance states (or fails cleanly where it is broken), and every
//! fixed or dynamic one reads byte for byte like `qemu-img convert -f vpc -O raw`.
//!
//! The permissive files come from `fixtures/`; the GPL/AGPL ones only from
//! `../shared/fixtures/real`, and their checks skip with a note when it is absent.

use crate::common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use common::fixtures::{Origin, fixture};
use common::{assert_same, oracles};
use sha2::{Digest, Sha256};
use vhd_merge::format::Geometry;
use vhd_merge::{DiskType, Error, OpenOptions, ReturnCode, SizeSource, Vhd};

// ---------------------------------------------------------------------------------------------
// Allocation watch: the largest single allocation made by the current thread while watching.
// Used to show that a hostile header does not make the reader allocate what it claims.

struct Watch;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = WATCHING.try_with(|w| {
        if w.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the wrapper only records
// sizes in thread-local cells, which never allocate.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

/// Run `f` and return its result with the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    WATCHING.with(|w| w.set(true));
    let r = f();
    WATCHING.with(|w| w.set(false));
    (r, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// The table: one row per file of ../shared/fixtures/real/PROVENANCE.md.

#[derive(Clone, Copy, Debug)]
struct Fact {
    /// Decompressed name under fixtures/ or ../shared/fixtures/real.
    rel: &'static str,
    /// Start of the sha256 of the decompressed file.
    sha256: &'static str,
    /// `None` for a file that is not a usable VHD.
    disk: Option<Disk>,
}

#[derive(Clone, Copy, Debug)]
struct Disk {
    disk_type: DiskType,
    current_size: u64,
    virtual_size: u64,
    size_source: SizeSource,
    creator: &'static str,
    version: &'static str,
    /// Allocated blocks (`None` for fixed disks).
    allocated: Option<usize>,
    /// Footer (and header) checksums are wrong: strict opening fails.
    bad_checksum: bool,
}

const fn disk(
    disk_type: DiskType,
    size: u64,
    creator: &'static str,
    version: &'static str,
    allocated: Option<usize>,
) -> Option<Disk> {
    Some(Disk {
        disk_type,
        current_size: size,
        virtual_size: size,
        size_source: SizeSource::CurrentSize,
        creator,
        version,
        allocated,
        bad_checksum: false,
    })
}

const fn bad_checksum(d: Option<Disk>) -> Option<Disk> {
    match d {
        Some(mut d) => {
            d.bad_checksum = true;
            Some(d)
        }
        None => None,
    }
}

use DiskType::{Differencing as Diff, Dynamic as Dyn, Fixed};

const FACTS: &[Fact] = &[
    Fact {
        rel: "dfvfs/ext2.vhd",
        sha256: "225f16a8d65ba442",
        disk: disk(Dyn, 4212736, "qemu", "5.3", Some(1)),
    },
    Fact {
        rel: "dfvfs/fat-differential.vhd",
        sha256: "17032553d22ecc1f",
        disk: disk(Diff, 4194304, "win ", "10.0", Some(1)),
    },
    Fact {
        rel: "dfvfs/image-differential.vhd",
        sha256: "cde4d1356f5c47d6",
        disk: bad_checksum(disk(Diff, 104448, "qemu", "5.3", Some(1))),
    },
    Fact {
        rel: "dfvfs/image.vhd",
        sha256: "6438e92bda74f4f2",
        disk: bad_checksum(disk(Dyn, 104448, "qemu", "5.3", Some(1))),
    },
    Fact {
        rel: "dissect-hypervisor/dynamic.vhd",
        sha256: "c480b888eb236597",
        disk: disk(Dyn, 10485760, "win ", "10.0", Some(3)),
    },
    Fact {
        rel: "dissect-hypervisor/fixed.vhd",
        sha256: "80220c551144b2a5",
        disk: disk(Fixed, 10485760, "win ", "10.0", None),
    },
    Fact {
        rel: "freebsd-mkimg/img-1x1-4096-mbr.vhd",
        sha256: "406017054e88172f",
        disk: disk(Dyn, 4352000, "*img", "2.0", Some(3)),
    },
    Fact {
        rel: "freebsd-mkimg/img-1x1-512-mbr.vhdf",
        sha256: "4ce35a405143e7b2",
        disk: disk(Fixed, 5242880, "*img", "2.0", None),
    },
    Fact {
        rel: "go-vhd/qemu.vhd",
        sha256: "aa6e1924b5d3b95d",
        disk: disk(Dyn, 41953280, "qemu", "5.3", Some(0)),
    },
    Fact {
        rel: "go-vhd/vbox.vhd",
        sha256: "693a9216cba21e31",
        disk: disk(Dyn, 41943040, "vbox", "4.3", Some(0)),
    },
    Fact {
        rel: "go-vhd/win8-child.vhd",
        sha256: "7accc1fda46604d8",
        disk: disk(Diff, 41943040, "win ", "10.0", Some(0)),
    },
    Fact {
        rel: "go-vhd/win8.1-1GB.vhd",
        sha256: "5371cc96a05776e2",
        disk: disk(Dyn, 1073741824, "win ", "6.3", Some(0)),
    },
    Fact {
        rel: "go-vhd/win8.vhd",
        sha256: "0b5639bf74ec8d3f",
        disk: disk(Dyn, 41943040, "win ", "6.3", Some(0)),
    },
    Fact {
        rel: "go-vhd/xapi.vhd",
        sha256: "00e900c2f5a0470f",
        disk: disk(Dyn, 41943040, "tap\\0", "1.3", Some(0)),
    },
    Fact {
        rel: "imhex-patterns/vhd.hexpat.vhd",
        sha256: "7b3b3b2f7cd94209",
        disk: disk(Fixed, 3145728, "win ", "10.0", None),
    },
    Fact {
        rel: "node-vhd/dynamic.vhd",
        sha256: "eac697a2503544ec",
        disk: disk(Dyn, 536870912, "win ", "10.0", Some(11)),
    },
    Fact {
        rel: "node-vhd/fixed.vhd",
        sha256: "f0a3af7d6d30b9a9",
        disk: disk(Fixed, 10485760, "win ", "10.0", None),
    },
    Fact {
        rel: "qemu-iotests/afl5.img",
        sha256: "36f4a8d05b5a1963",
        disk: None,
    },
    Fact {
        rel: "qemu-iotests/d2v-zerofilled.vhd",
        sha256: "af175e3c442b659e",
        disk: disk(Dyn, 263454720, "d2v\\0", "1.0", Some(126)),
    },
    Fact {
        rel: "qemu-iotests/hyperv2012r2-dynamic.vhd",
        sha256: "1340b8a51517ba5f",
        disk: disk(Dyn, 136365211648, "win ", "6.3", Some(0)),
    },
    Fact {
        rel: "qemu-iotests/virtualpc-dynamic.vhd",
        sha256: "7675fd9bcc5f705f",
        disk: Some(Disk {
            disk_type: Dyn,
            current_size: 136365211648,
            // Virtual PC's guest sees the CHS size: 65278 x 16 x 255 x 512 (§1.5).
            virtual_size: 136363130880,
            size_source: SizeSource::Chs,
            creator: "vpc ",
            version: "1.0",
            allocated: Some(0),
            bad_checksum: false,
        }),
    },
    Fact {
        rel: "vhd-forensic/fixed.vhd",
        sha256: "5e019761f995976a",
        disk: disk(Fixed, 1079296, "qemu", "5.3", None),
    },
    Fact {
        rel: "vhd-forensic/minimal.vhd",
        sha256: "5234fb5e52be5f00",
        disk: disk(Dyn, 1079296, "qemu", "5.3", Some(0)),
    },
    Fact {
        rel: "vhd-forensic/original-size-mismatch.vhd",
        sha256: "325be8c1531e6618",
        disk: disk(Dyn, 2123776, "qemu", "5.3", Some(0)),
    },
    Fact {
        rel: "vhd-shell/test-80d7dec.vhd",
        sha256: "e7e86b2e7ad708f5",
        disk: disk(Dyn, 6291456, "caml", "0.1", Some(1)),
    },
    Fact {
        rel: "vhd-shell/test-88a02b1.vhd",
        sha256: "f5a74fb32063ac30",
        disk: disk(Dyn, 6291456, "caml", "0.1", Some(0)),
    },
    Fact {
        rel: "vhdtool/win7dyn.vhd",
        sha256: "40ea48d59418801e",
        disk: disk(Dyn, 209715200, "win ", "6.1", Some(6)),
    },
    Fact {
        rel: "vhdtool/win7fixed.vhd",
        sha256: "2421c01b392a42e6",
        disk: disk(Fixed, 209715200, "win ", "6.1", None),
    },
];

/// The files of the table this run can reach, with where each came from.
fn available() -> Vec<(Fact, std::path::PathBuf, Origin)> {
    FACTS
        .iter()
        .filter_map(|f| fixture(f.rel).map(|(p, o)| (*f, p, o)))
        .collect()
}

fn sha256_hex(path: &Path) -> String {
    let mut h = Sha256::new();
    let mut file = File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn lenient() -> OpenOptions {
    OpenOptions::read_only().lenient(true)
}

// ---------------------------------------------------------------------------------------------

/// The permissive files are all in the repository, so this part never skips.
#[test]
fn repository_has_the_permissive_fixtures() {
    let in_repo = FACTS
        .iter()
        .filter(|f| fixture(f.rel).is_some_and(|(_, o)| o == Origin::Repo))
        .count();
    assert_eq!(
        in_repo, 17,
        "fixtures/ should hold the 17 MIT/Apache/BSD files"
    );
}

#[test]
fn every_fixture_has_its_stated_type_size_and_allocation() {
    let mut checked = 0;
    for (fact, path, _) in available() {
        let what = fact.rel;
        assert!(
            sha256_hex(&path).starts_with(fact.sha256),
            "{what}: not the published file (sha256 mismatch)"
        );
        let Some(d) = fact.disk else {
            continue; // afl5: see its own test
        };
        let strict = Vhd::open(&path, OpenOptions::read_only());
        let vhd = if d.bad_checksum {
            let e = strict.expect_err(what);
            assert!(e.is_checksum(), "{what}: {e}");
            assert_eq!(e.return_code(), ReturnCode::IncorrectDataType, "{what}");
            Vhd::open(&path, lenient()).unwrap_or_else(|e| panic!("{what} (lenient): {e}"))
        } else {
            strict.unwrap_or_else(|e| panic!("{what}: {e}"))
        };
        let f = vhd.footer();
        assert_eq!(vhd.disk_type(), d.disk_type, "{what}");
        assert_eq!(f.current_size, d.current_size, "{what}");
        assert_eq!(vhd.virtual_size(), d.virtual_size, "{what}");
        assert_eq!(vhd.size_source(), d.size_source, "{what}");
        assert_eq!(f.creator_application_str(), d.creator, "{what}");
        assert_eq!(f.creator_version_str(), d.version, "{what}");
        match d.allocated {
            Some(n) => {
                assert_eq!(vhd.allocated_blocks(), n, "{what}");
                assert_eq!(vhd.header().unwrap().block_size, 2 << 20, "{what}");
            }
            None => assert!(vhd.header().is_none(), "{what}"),
        }
        let checksum_warnings = vhd
            .warnings()
            .iter()
            .filter(|w| w.contains("checksum"))
            .count();
        let other_warnings: Vec<&String> = vhd
            .warnings()
            .iter()
            .filter(|w| !w.contains("checksum") && !w.contains("CHS size"))
            .collect();
        assert_eq!(checksum_warnings > 0, d.bad_checksum, "{what}");
        assert!(
            other_warnings.is_empty(),
            "{what}: unexpected warnings {other_warnings:?}"
        );
        // The stored geometry is the spec's CHS for Current Size, except where the writer put
        // the 65535/16/255 "use Current Size" marker (Disk2vhd).
        if f.geometry != Geometry::MAX {
            assert_eq!(
                Geometry::for_size(f.current_size),
                f.geometry,
                "{what}: CHS"
            );
        }
        // Every data sector is readable (the 127 GiB empty ones: the first and last 4 MiB).
        read_all_own(&vhd, what);
        checked += 1;
    }
    eprintln!("checked {checked} fixture files");
    assert!(checked >= 16);
}

fn read_all_own(vhd: &Vhd, what: &str) {
    let size = vhd.virtual_size();
    let chunk = 4u64 << 20;
    let ranges: Vec<(u64, u64)> = if size > 2 << 30 {
        vec![(0, chunk), (size - chunk, chunk)]
    } else {
        (0..size.div_ceil(chunk))
            .map(|i| (i * chunk, chunk.min(size - i * chunk)))
            .collect()
    };
    let mut buf = vec![0u8; chunk as usize];
    for (off, len) in ranges {
        vhd.read_own(off, &mut buf[..len as usize])
            .unwrap_or_else(|e| panic!("{what}: read at {off}: {e}"));
    }
}

/// qemu-iotests' afl5.img: fuzzed, 1028 bytes, Max Table Entries 0x40000001 and no footer at
/// the end. It must fail with a format error, allocating nothing near what it claims.
#[test]
fn afl5_is_a_clean_error_without_a_large_allocation() {
    let Some((path, _)) = fixture("qemu-iotests/afl5.img") else {
        return;
    };
    for opts in [OpenOptions::read_only(), lenient()] {
        let (res, largest) = largest_allocation(|| Vhd::open(&path, opts));
        let e = res.expect_err("afl5.img must not open");
        assert_eq!(e.return_code(), ReturnCode::IncorrectDataType, "{e}");
        assert!(e.to_string().contains("afl5.img"), "names the file: {e}");
        assert!(largest < 64 * 1024, "largest allocation {largest} bytes");
    }
    if let Some(out) = run_info(&path, &["--json"]) {
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error 32776 (Incorrect data type): "),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        // --json: the error object on stdout too (docs/json.md).
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["error"]["return_code"], 32776, "{j}");
    }
}

/// The same hostile BAT size inside a file long enough to hold the header: the BAT check must
/// fire before the table is read.
#[test]
fn huge_max_table_entries_is_refused_before_allocating() {
    let Some((path, _)) = fixture("go-vhd/win8.vhd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let evil = dir.path().join("evil.vhd");
    let mut bytes = common::read(&path);
    let mut h =
        vhd_merge::format::DynamicHeader::parse(bytes[512..1536].try_into().unwrap()).unwrap();
    h.max_table_entries = 0x4000_0001;
    bytes[512..1536].copy_from_slice(&h.to_bytes());
    std::fs::write(&evil, &bytes).unwrap();
    let (res, largest) = largest_allocation(|| Vhd::open(&evil, OpenOptions::read_only()));
    let e = res.expect_err("must not open");
    assert_eq!(e.return_code(), ReturnCode::IncorrectDataType, "{e}");
    assert!(e.to_string().contains("BAT"), "{e}");
    assert!(largest < 64 * 1024, "largest allocation {largest} bytes");
}

/// dfvfs's image.vhd and image-differential.vhd have bad checksums: strict opening names the
/// checksum (ReturnCode 32776), lenient opening succeeds and warns.
#[test]
fn bad_checksums_fail_strictly_and_open_leniently() {
    for rel in ["dfvfs/image.vhd", "dfvfs/image-differential.vhd"] {
        let (path, _) = fixture(rel).unwrap();
        let e = Vhd::open(&path, OpenOptions::read_only()).unwrap_err();
        assert!(matches!(e, Error::Checksum { .. }), "{rel}: {e}");
        assert_eq!(e.return_code().code(), 32776);
        assert!(e.to_string().contains("footer checksum mismatch"), "{e}");
        let v = Vhd::open(&path, lenient()).unwrap();
        assert!(v.warnings().iter().any(|w| w.contains("footer checksum")));
        // The hand-made child also has a bad dynamic header checksum; image.vhd's is right.
        assert_eq!(
            v.warnings()
                .iter()
                .any(|w| w.contains("dynamic header checksum")),
            rel.ends_with("differential.vhd"),
            "{rel}: {:?}",
            v.warnings()
        );

        let Some(out) = run_info(&path, &[]) else {
            continue;
        };
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error 32776 (Incorrect data type): ") && err.contains("checksum"),
            "{err}"
        );
        let out = run_info(&path, &["--json", "--lenient"]).unwrap();
        assert!(out.status.success());
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["virtual_size"], 104448);
        assert_eq!(j["warnings"].as_array().unwrap().len(), v.warnings().len());
        assert!(
            j["warnings"][0]
                .as_str()
                .unwrap()
                .contains("footer checksum")
        );
    }
}

/// image-differential.vhd's one block holds every sector, with the same data as its parent
/// image.vhd (its provenance note): the two files' own data read the same.
#[test]
fn image_differential_holds_its_parents_data() {
    let (parent, _) = fixture("dfvfs/image.vhd").unwrap();
    let (child, _) = fixture("dfvfs/image-differential.vhd").unwrap();
    let p = Vhd::open(&parent, lenient()).unwrap();
    let c = Vhd::open(&child, lenient()).unwrap();
    assert_eq!(c.parent_unique_id(), Some(p.unique_id()));
    assert_eq!(c.header().unwrap().parent_name(), "image.vhd");
    assert!(c.header().unwrap().locators.iter().all(|l| l.is_empty()));
    let mut a = vec![0u8; 104448];
    let mut b = vec![0u8; 104448];
    p.read_own(0, &mut a).unwrap();
    c.read_own(0, &mut b).unwrap();
    assert!(a.iter().any(|&x| x != 0), "the parent has data");
    assert_same(&b, &a, "image-differential vs image");
}

/// Windows' win8-child.vhd: parent id, name and both locators, through the library and
/// through `info --json`.
#[test]
fn windows_child_locators_decode() {
    let (child, _) = fixture("go-vhd/win8-child.vhd").unwrap();
    let (parent, _) = fixture("go-vhd/win8.vhd").unwrap();
    let c = Vhd::open(&child, OpenOptions::read_only()).unwrap();
    let p = Vhd::open(&parent, OpenOptions::read_only()).unwrap();
    assert_eq!(c.parent_unique_id(), Some(p.unique_id()));
    let h = c.header().unwrap();
    assert_eq!(h.parent_name(), r"C:\Users\sergi\Downloads\win8.vhd");
    let decoded: Vec<(String, String)> = (0..8)
        .filter_map(|i| {
            let data = c.read_locator_payload(i).unwrap()?;
            let code = h.locators[i].platform_code;
            Some((code.name(), code.decode_payload(&data).unwrap()))
        })
        .collect();
    assert_eq!(
        decoded,
        vec![
            (
                "W2ku".to_string(),
                r"C:\Users\sergi\Downloads\win8.vhd".to_string()
            ),
            ("W2ru".to_string(), r".\win8.vhd".to_string()),
        ]
    );
    // Data Space in bytes, as Windows writes it.
    assert_eq!(h.locators[0].data_space, 4096);
    assert_eq!(h.locators[1].data_space, 65536);

    let Some(out) = run_info(&child, &["--json"]) else {
        return;
    };
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["disk_type"], "differencing");
    assert_eq!(j["parent_unique_id"], p.unique_id().to_string());
    assert_eq!(j["parent_name"], r"C:\Users\sergi\Downloads\win8.vhd");
    let locs = j["parent_locators"].as_array().unwrap();
    assert_eq!(locs.len(), 2);
    assert_eq!(locs[0]["platform_code"], "W2ku");
    assert_eq!(locs[0]["path"], r"C:\Users\sergi\Downloads\win8.vhd");
    assert_eq!(locs[0]["data_space"], 4096);
    assert_eq!(locs[1]["platform_code"], "W2ru");
    assert_eq!(locs[1]["path"], r".\win8.vhd");
    assert_eq!(locs[1]["slot"], 1);
    assert_eq!(j["timestamp"], 647346334);
    assert_eq!(j["timestamp_utc"], "2020-07-06T10:25:34Z");
}

/// Size rules through the binary: Virtual PC (CHS), Hyper-V 2012 R2 and Disk2vhd (Current
/// Size), blktap (opens, batmap after the BAT is not mistaken for anything).
#[test]
fn info_json_size_rules() {
    let cases = [
        ("qemu-iotests/virtualpc-dynamic.vhd", 136363130880u64, "chs"),
        (
            "qemu-iotests/hyperv2012r2-dynamic.vhd",
            136365211648,
            "current_size",
        ),
        ("qemu-iotests/d2v-zerofilled.vhd", 263454720, "current_size"),
        ("go-vhd/xapi.vhd", 41943040, "current_size"),
    ];
    for (rel, size, source) in cases {
        let Some((path, _)) = fixture(rel) else {
            continue;
        };
        let Some(out) = run_info(&path, &["--json"]) else {
            return;
        };
        assert!(out.status.success(), "{rel}");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["virtual_size"], size, "{rel}");
        assert_eq!(j["size_source"], source, "{rel}");
        assert_eq!(j["block_size"], 2 << 20, "{rel}");
        assert_eq!(j["parent_unique_id"], serde_json::Value::Null, "{rel}");
        assert_eq!(
            j["file_size"],
            std::fs::metadata(&path).unwrap().len(),
            "{rel}"
        );
    }
}

/// FreeBSD mkimg writes all-0x01 unique ids in its unit-testing mode; vhd-forensic's
/// original-size-mismatch.vhd has Original Size 1061888 (the provenance notes).
#[test]
fn provenance_notes_hold() {
    let (p, _) = fixture("freebsd-mkimg/img-1x1-4096-mbr.vhd").unwrap();
    let v = Vhd::open(&p, OpenOptions::read_only()).unwrap();
    assert_eq!(v.unique_id().as_bytes(), &[1u8; 16]);
    let (p, _) = fixture("vhd-forensic/original-size-mismatch.vhd").unwrap();
    let v = Vhd::open(&p, OpenOptions::read_only()).unwrap();
    assert_eq!(v.footer().original_size, 1061888);
    assert_eq!(v.virtual_size(), 2123776);
    let (p, _) = fixture("go-vhd/xapi.vhd").unwrap();
    let v = Vhd::open(&p, OpenOptions::read_only()).unwrap();
    assert_eq!(v.footer().creator_host_os, 0);
    // blktap's private batmap header sits in the sector after the BAT.
    let h = v.header().unwrap();
    let mut cookie = [0u8; 8];
    v.read_raw(h.table_offset + 512, &mut cookie).unwrap();
    assert_eq!(&cookie, b"tdbatmap");
}

// ---------------------------------------------------------------------------------------------
// qemu-img as the oracle for fixed and dynamic files.

/// Compare our read of the whole disk with qemu-img's raw conversion, chunk by chunk. Where
/// qemu's size differs (older qemu applies the CHS size to more creators than Virtual PC,
/// §1.5), the common prefix is compared and the difference must be exactly that rule.
fn compare_with_qemu(vhd: &Vhd, what: &str) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("qemu.raw");
    match oracles::qemu_img_convert(vhd.path(), &raw) {
        None => return false,
        Some(Err(e)) => panic!("{what}: qemu-img refused the file: {e}"),
        Some(Ok(())) => {}
    }
    let qemu_len = std::fs::metadata(&raw).unwrap().len();
    let ours = vhd.virtual_size();
    if qemu_len != ours {
        let f = vhd.footer();
        assert!(
            qemu_len == f.geometry.size() && !f.current_size_is_authoritative(),
            "{what}: qemu reads {qemu_len} bytes, we read {ours}, and CHS does not explain it"
        );
        eprintln!("note: {what}: qemu uses the CHS size {qemu_len}; comparing the common prefix");
    }
    let common_len = qemu_len.min(ours);
    let mut file = File::open(&raw).unwrap();
    let chunk = 4usize << 20;
    let mut a = vec![0u8; chunk];
    let mut b = vec![0u8; chunk];
    let mut off = 0u64;
    while off < common_len {
        let n = (common_len - off).min(chunk as u64) as usize;
        vhd.read_own(off, &mut a[..n]).unwrap();
        file.read_exact(&mut b[..n]).unwrap();
        assert_same(&a[..n], &b[..n], &format!("{what} at offset {off}"));
        off += n as u64;
    }
    true
}

/// Every fixed and dynamic fixture up to 1 GiB: all bytes equal to qemu-img's conversion. The
/// 127 GiB empty ones: qemu's size and map (no data anywhere) agree with ours.
#[test]
fn fixed_and_dynamic_fixtures_read_like_qemu_img() {
    let mut compared = Vec::new();
    for (fact, path, _) in available() {
        let Some(d) = fact.disk else { continue };
        if d.disk_type == Diff || d.bad_checksum {
            // qemu ignores parents (never an oracle for differencing disks) and modern qemu
            // refuses bad checksums.
            continue;
        }
        let vhd = Vhd::open(&path, OpenOptions::read_only()).unwrap();
        if vhd.virtual_size() > 1 << 30 {
            let Some(q) = oracles::qemu_img_virtual_size(&path) else {
                return;
            };
            assert_eq!(q.unwrap(), vhd.virtual_size(), "{}", fact.rel);
            assert_eq!(vhd.allocated_blocks(), 0);
            assert!(
                oracles::qemu_img_map_has_no_data(&path).unwrap(),
                "{}",
                fact.rel
            );
            compared.push(fact.rel);
            continue;
        }
        if !compare_with_qemu(&vhd, fact.rel) {
            return;
        }
        compared.push(fact.rel);
    }
    eprintln!("compared with qemu-img: {compared:?}");
    assert!(compared.contains(&"node-vhd/dynamic.vhd"));
}

/// node-vhd's dynamic.vhd has real data in 11 blocks: what we read is what qemu reads, and it
/// is not all zeros (so the comparison above means something).
#[test]
fn node_vhd_dynamic_data_matches_qemu() {
    let (path, _) = fixture("node-vhd/dynamic.vhd").unwrap();
    let vhd = Vhd::open(&path, OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 2 << 20];
    let mut nonzero_blocks = 0;
    for b in 0..vhd.block_count() {
        vhd.read_own(b * (2 << 20), &mut buf).unwrap();
        if buf.iter().any(|&x| x != 0) {
            nonzero_blocks += 1;
        }
    }
    assert!(nonzero_blocks >= 5, "{nonzero_blocks} blocks hold data");
    compare_with_qemu(&vhd, "node-vhd/dynamic.vhd");
}

fn run_info(path: &Path, extra: &[&str]) -> Option<std::process::Output> {
    let bin = common::binary()?;
    Some(
        Command::new(bin)
            .arg("info")
            .args(extra)
            .arg(path)
            .output()
            .unwrap(),
    )
}

/// A child created over a Virtual PC parent (whose guest sees the CHS size, smaller than its
/// Current Size) has the parent's virtual size and merges back into it.
#[test]
fn child_of_a_virtual_pc_parent_merges_back() {
    let dir = tempfile::tempdir().unwrap();
    let Some(parent) =
        common::fixtures::fixture_copy("qemu-iotests/virtualpc-dynamic.vhd", dir.path())
    else {
        return;
    };
    let psize = Vhd::open(&parent, OpenOptions::read_only())
        .unwrap()
        .virtual_size();
    let child = dir.path().join("child.vhd");
    let opts = vhd_merge::create::CreateOptions::default();
    let mut c = vhd_merge::create::create_differencing(&child, &parent, &opts).unwrap();
    assert_eq!(c.virtual_size(), psize);
    assert_eq!(c.size_source(), SizeSource::CurrentSize);
    c.write_at(psize - 4096, &[0xA5; 4096]).unwrap();
    drop(c);
    vhd_merge::merge::merge(&child, None, &vhd_merge::merge::MergeOptions::default()).unwrap();
    let p = Vhd::open(&parent, OpenOptions::read_only()).unwrap();
    assert_eq!(p.virtual_size(), psize);
    let mut buf = [0u8; 8192];
    p.read_own(psize - 8192, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert!(buf[4096..].iter().all(|&b| b == 0xA5));
}
