//! Merging a fuzzed child into a valid parent (see `vhd_merge_fuzz::merge_one` for what is
//! checked): the input is `child.vhd` next to a fresh copy of the parent in /dev/shm.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhd_merge_fuzz::merge_one(vhd_merge_fuzz::chain_dir(), data);
});
