#!/bin/sh
# Build the fuzz corpora in fuzz/corpus/<target>/ from generated files and fixtures.
# Fixtures: the project's fixtures/ and, when present, ../shared/fixtures/real (decompressed
# into a temporary directory; those files are not copied into the repository).
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in ../fixtures/*/* ../../shared/fixtures/real/*/*; do
    [ -f "$f" ] || continue
    b=$(basename "$f")
    d=$(basename "$(dirname "$f")")
    case "$f" in
        *.gz) gunzip -c "$f" > "$tmp/$d-${b%.gz}" ;;
        *.bz2) bunzip2 -c "$f" > "$tmp/$d-${b%.bz2}" ;;
        *.md|*.txt) ;;
        *) cp "$f" "$tmp/$d-$b" ;;
    esac
done
cargo run --release --bin make-seeds -- corpus "$tmp"/*
ls corpus/*/ | head -50
