//! Opening a whole file from bytes (strict and lenient), reading it, and checking it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd_merge::io::MemStorage;
use vhd_merge::{OpenOptions, Vhd};

fuzz_target!(|data: &[u8]| {
    for lenient in [false, true] {
        let storage = Box::new(MemStorage::with_limit(data.to_vec(), 4 << 20));
        let opts = OpenOptions {
            lenient,
            ..OpenOptions::read_only()
        };
        if let Ok(vhd) = Vhd::from_storage(storage, "fuzz.vhd", opts) {
            vhd_merge_fuzz::exercise_vhd(&vhd);
        }
    }
});
