//! The integration tests, one binary with a module per subject (one link and one copy of
//! `tests/common` instead of one per file; issue 10 item 7). Run one subject with a filter:
//! `cargo test --release --test suite merge_scale::`. `tests/bad_input.rs` stays a binary of
//! its own: it measures whole-process allocation peaks, which tests running beside it in the
//! same process would spoil.
//!
//! `fixtures` installs this binary's global allocator (a per-thread watch of the largest
//! allocation; it counts nothing on threads that are not watching).

#[path = "../common/mod.rs"]
mod common;

mod chain;
mod check;
mod cli;
mod cli_json;
mod cli_signals;
mod clone;
mod concurrency;
mod crash;
mod fixtures;
mod flatten;
mod format;
mod fuzz_regressions;
mod interop;
mod merge;
mod merge_faults;
mod merge_interop;
mod merge_scale;
mod repair;
mod reports;
mod setparent;
mod untrusted;
mod vhdx_chain;
mod vhdx_check;
mod vhdx_crash;
mod vhdx_fixtures;
mod vhdx_format;
mod vhdx_interop;
mod vhdx_merge;
mod vhdx_merge_faults;
mod vhdx_write;
