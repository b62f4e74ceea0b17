#!/usr/bin/env bash
# Windows, under Wine: cross-build vhd-merge for x86_64-pc-windows-gnu with Debian's mingw-w64,
# lint that build, and run the test suite, the doc tests and the demo under Debian's Wine.
# Also lints the macOS build (aarch64-apple-darwin: only its std is needed, no linker).
#
# Called by .ci/run; runs alone too (as root on Debian 12, from anywhere). When a piece cannot
# be installed (no apt mirror, no rustup dist server) it says so and skips that part with
# exit status 0: CI on such a machine stays green and its log says what was not tested. A
# test that fails under Wine fails the step.
#
# What runs under Wine, and what does not (README, "Platforms"):
# - the unit tests, the doc tests, the demo, and the subjects in WINE_TESTS below (modules of
#   tests/suite, and the bad_input binary), built
#   with the test profile (opt-level 2); tests/suite/merge.rs with 16 instead of 256 random chains
#   per property (PROPTEST_CASES). Tests that need what only Unix has are compiled and
#   reported as ignored with the reason (tests/common/os.rs says how they are marked). The
#   other subjects are compiled but not run: under Wine, whose
#   file operations go through wineserver, they take many times as long as on Linux (crash
#   110 s, flatten 75 s, fuzz_regressions 280 s, vhdx_fixtures 100 s, merge_faults more than
#   8 minutes), too long for CI. `WINE_TESTS=all .ci/windows.sh` runs every subject;
# - the oracles (qemu-img, qemu-io, libvhdi) are not installed inside Wine, so the tests that
#   need them skip with a note: VHD_MERGE_REQUIRE_ORACLES and VHD_MERGE_PYTHON are removed
#   from the environment of this step;
# - Wine is not Windows: file locking, sharing modes and the read-only attribute follow Wine's
#   mapping onto Linux (as root, the read-only attribute does not stop writes, and the tests
#   that need it skip with a note).
#
# ProcessPrng: Rust's std (1.78 and later) calls ProcessPrng from bcryptprimitives.dll, which
# Debian 12's wine 8.0 lacks (added in Wine 9): without it every Rust .exe fails to start with
# "Library bcryptprimitives.dll ... not found" (status c0000135). When the Wine prefix has no
# bcryptprimitives.dll, this script builds .ci/bcryptprimitives.c (a 20-line DLL exporting
# ProcessPrng on top of RtlGenRandom) with mingw and puts it into the prefix's system32. The
# prefix lives in target/wine-prefix; nothing outside target/ and the apt packages changes.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR=never
export DEBIAN_FRONTEND=noninteractive
WIN=x86_64-pc-windows-gnu
MAC=aarch64-apple-darwin
TARGET_DIR=${CARGO_TARGET_DIR:-target}
# No debug info in the Windows builds: mingw's linker spends most of its time on DWARF, and a
# panic message still names the file and line.
export CARGO_PROFILE_TEST_DEBUG=0
# The test subjects run under Wine in CI: those that take at most about 40 s there and test
# something Windows changes (paths, locking, files); the oracle-only ones would only skip.
WINE_TESTS=${WINE_TESTS:-bad_input chain check cli format merge repair setparent vhdx_format vhdx_write}

step() { printf '\n==> %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
skip() {
    echo "SKIPPED: $*"
    exit 0
}

step "macOS: cargo clippy --target $MAC"
if timeout 300 rustup target add "$MAC" >/dev/null 2>&1; then
    # The library and the binary. The tests and benches are not linted for macOS: criterion's
    # dependency alloca compiles C in its build script, which needs a macOS C toolchain.
    cargo clippy --target "$MAC" --lib --bins -- -D warnings
else
    echo "SKIPPED: rustup could not add the $MAC target on this machine"
fi

step "Windows: toolchain (mingw-w64, Wine, the $WIN target)"
if ! command -v x86_64-w64-mingw32-gcc >/dev/null || ! command -v wine >/dev/null; then
    if ! { timeout 300 apt-get update -q && timeout 600 apt-get install -y -q \
        --no-install-recommends gcc-mingw-w64-x86-64 wine wine64; }; then
        skip "apt could not install mingw-w64 and Wine on this machine"
    fi
fi
timeout 300 rustup target add "$WIN" >/dev/null 2>&1 ||
    skip "rustup could not add the $WIN target on this machine"
wine --version
x86_64-w64-mingw32-gcc --version | head -n 1

# Every target, the test binaries that do not run below included: they all compile (and lint)
# for Windows.
step "Windows: cargo clippy --target $WIN"
cargo clippy --target "$WIN" --all-targets -- -D warnings

step "Windows: Wine prefix"
export WINEPREFIX="$(realpath "$TARGET_DIR")/wine-prefix"
export WINEDEBUG=-all
# No desktop, no Mono or Gecko installers: a console prefix is all the tests need.
export WINEDLLOVERRIDES="mscoree,mshtml,winemenubuilder.exe="
mkdir -p "$WINEPREFIX"
wineboot --init >/dev/null 2>&1 || true
wineserver --wait || true
system32="$WINEPREFIX/drive_c/windows/system32"
[ -d "$system32" ] || skip "wineboot did not create a Wine prefix in $WINEPREFIX"
if [ ! -e "$system32/bcryptprimitives.dll" ]; then
    echo "this Wine has no bcryptprimitives.dll: installing the ProcessPrng shim"
    x86_64-w64-mingw32-gcc -shared -O2 -s -o "$system32/bcryptprimitives.dll" \
        .ci/bcryptprimitives.c -ladvapi32
fi

# The tests' temporary files go to %TEMP%. On Linux they are on tmpfs (fast_tempdir), where
# fsync costs nothing; in a prefix on disk the crash tests' thousands of syncs are real and
# take many minutes. So %TEMP% is made a link to a directory on /dev/shm.
if [ -d /dev/shm ]; then
    wintemp=$(winepath -u "$(wine cmd /c echo %TEMP% | tr -d '\r')")
    shmtemp=$(mktemp -d /dev/shm/vhd-merge-wine.XXXXXX)
    trap 'rm -rf "$shmtemp"' EXIT
    rm -rf "$wintemp"
    ln -s "$shmtemp" "$wintemp"
fi

step "Windows: the tests under Wine"
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=wine
unset VHD_MERGE_REQUIRE_ORACLES VHD_MERGE_PYTHON
export PROPTEST_CASES=${PROPTEST_CASES:-16}
# bad_input measures whole-process allocation peaks, which a test running beside it in
# another thread can spoil (under Wine, slower, it did once): its tests run one at a time.
# The integration tests are one binary, tests/suite, with a module per subject: the subjects
# not in WINE_TESTS are skipped by name (`--skip MODULE::`; every test's name starts with its
# module's).
# (The skips apply to that binary only: the library's unit tests have module names too.)
skips=()
if [ "$WINE_TESTS" != all ]; then
    for m in $(sed -nE 's/^mod ([a-z_0-9]+);$/\1/p' tests/suite/main.rs); do
        [[ " $WINE_TESTS " == *" $m "* ]] || skips+=(--skip "$m::")
    done
fi
log="$TARGET_DIR/wine-tests.log"
# Wine itself fails now and then: in CI runs, a CreateProcess error 1359 in one of the 60
# processes a cli test starts, and an allocation peak of bad_input spoiled by a slower
# neighbour. A test binary that fails is run once more, alone and one test at a time, and the
# step fails only if it fails again; the log keeps both runs and names the binary.
run_failed_once_more() {
    local again t ok=0
    again=$(grep -oE 'to rerun pass `[^`]+`' "$log" | sed -E 's/.*`(.*)`/\1/' | sort -u)
    [ -n "$again" ] || return 1
    echo "FAILED under Wine, running once more: $again" | tee -a "$log"
    while read -r t; do
        local only=()
        [ "$t" != "--test suite" ] || only=("${skips[@]}")
        # shellcheck disable=SC2086 # "--test name": two words
        cargo test --target "$WIN" $t -- --test-threads=1 "${only[@]}" >> "$log" 2>&1 || ok=1
    done <<< "$again"
    return "$ok"
}
: > "$log"
tests_ok=0
run() { "$@" >> "$log" 2>&1 || tests_ok=1; }
run cargo test --target "$WIN" --no-fail-fast --lib --bins
run cargo test --target "$WIN" --no-fail-fast --test suite -- "${skips[@]}"
if [ "$WINE_TESTS" = all ] || [[ " $WINE_TESTS " == *" bad_input "* ]]; then
    run cargo test --target "$WIN" --test bad_input -- --test-threads=1
fi
run cargo test --target "$WIN" --doc
if [ "$tests_ok" != 0 ] && run_failed_once_more; then
    tests_ok=0
fi
[ "$tests_ok" = 0 ] || cat "$log"
# One line per test binary: what passed, failed and was ignored.
grep -E '^(     Running|   Doc-tests|test result:)' "$log" |
    sed -E 's/^ +Running (unittests )?([^ ]+).*/\2/; s/^ +Doc-tests (.*)/doc tests (\1)/' |
    paste -d' ' - - | sed -E 's/; [0-9]+ measured.*$//' || true
[ "$tests_ok" = 0 ] || exit 1

step "Windows: the demo under Wine"
# With the test profile, so that it reuses the library the tests built.
cargo run --profile test --target "$WIN" --example demo

wineserver --kill || true
step "Windows: done"
