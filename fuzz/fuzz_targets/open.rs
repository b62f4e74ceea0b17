//! Opening a whole file from bytes (strict and lenient), reading it, checking it, and
//! repairing it: repair must leave a file that opens strictly and needs no further repair.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd_merge::check::{CheckOptions, check_storage};
use vhd_merge::io::MemStorage;
use vhd_merge::repair::{RepairOptions, repair_storage};
use vhd_merge::{OpenOptions, Vhd};
use vhd_merge_fuzz::shared;

const LIMIT: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    for lenient in [false, true] {
        let storage = Box::new(MemStorage::with_limit(data.to_vec(), LIMIT));
        let opts = OpenOptions {
            lenient,
            ..OpenOptions::read_only()
        };
        if let Ok(vhd) = Vhd::from_storage(storage, "fuzz.vhd", opts) {
            vhd_merge_fuzz::exercise_vhd(&vhd);
        }
    }
    let deep = CheckOptions {
        deep: true,
        ..CheckOptions::default()
    };
    let _ = check_storage(
        Box::new(MemStorage::with_limit(data.to_vec(), LIMIT)),
        "fuzz.vhd",
        &deep,
    );

    let mem = shared(data.to_vec(), LIMIT);
    if let Ok(report) = repair_storage(Box::new(mem.clone()), "fuzz.vhd", &RepairOptions::default())
    {
        let after = mem.to_vec();
        if report.is_clean() {
            assert_eq!(after, data, "a repair with nothing to do wrote");
        }
        let again = repair_storage(
            Box::new(shared(after.clone(), LIMIT)),
            "fuzz.vhd",
            &RepairOptions::default(),
        )
        .expect("a repaired file is repairable");
        assert!(again.is_clean(), "repair is not idempotent: {again:?}");
        Vhd::from_storage(
            Box::new(MemStorage::with_limit(after, LIMIT)),
            "fuzz.vhd",
            OpenOptions::read_only(),
        )
        .expect("a repaired file opens strictly");
    }
});
