//! Opening a chain whose child is the fuzzed bytes, next to a fixed valid parent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd_merge::{Chain, ChainOptions};

fuzz_target!(|data: &[u8]| {
    let dir = vhd_merge_fuzz::chain_dir();
    let child = dir.join("child.vhd");
    if std::fs::write(&child, data).is_err() {
        return;
    }
    let confined = ChainOptions {
        ignore_absolute_locators: true,
        confine_to: Some(vec![dir.to_path_buf()]),
        ..ChainOptions::default()
    };
    for opts in [ChainOptions::default(), confined] {
        if let Ok(chain) = Chain::open(&child, &opts) {
            vhd_merge_fuzz::exercise_chain(&chain);
        }
    }
});
