//! Helpers shared by the integration tests. Each test file includes them with `mod common;`
//! and compiles its own copy, in which the helpers it does not use are dead code: hence the
//! module-wide `allow(dead_code)`.
//!
//! - [`oracles`]: qemu-img, qemu-io and libvhdi, and the rule for a missing one;
//! - [`fixtures`]: the real files from other tools, decompressed;
//! - here: the CLI binary, a deterministic random generator and byte comparisons.
#![allow(dead_code)]

pub mod fixtures;
pub mod oracles;

use std::io::Write;
use std::path::{Path, PathBuf};

/// Print a note that `cargo test` shows even for passing tests (it captures only the print
/// macros, not direct writes to stderr).
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "note: {text}");
}

/// The built `vhd-merge` binary, when Cargo built it (the `cli` feature).
pub fn binary() -> Option<PathBuf> {
    match option_env!("CARGO_BIN_EXE_vhd-merge") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            note("skipping: the vhd-merge binary is not built (feature `cli` off)");
            None
        }
    }
}

/// A small deterministic generator (xorshift64*) for test data and write patterns: a failing
/// case replays exactly from its seed. The seeding is the one the merge tests' saved proptest
/// cases (tests/merge.proptest-regressions) were found with: changing it would make them
/// replay other chains.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with a probability of `percent` in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// Shuffle `v` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Assert two byte strings are equal, naming the first differing 512-byte sector instead of
/// printing megabytes.
pub fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: lengths differ ({} vs {})",
        actual.len(),
        expected.len()
    );
    if actual == expected {
        return;
    }
    let i = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let s = i / 512;
    panic!(
        "{what}: first difference at byte {i} (sector {s}): got {:02x?}, expected {:02x?}",
        &actual[s * 512..(s * 512 + 16).min(actual.len())],
        &expected[s * 512..(s * 512 + 16).min(expected.len())]
    );
}

/// Read a whole file.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
