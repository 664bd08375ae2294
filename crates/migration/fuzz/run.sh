#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 240) on the stable toolchain:
# cargo-fuzz needs nightly flags (-Zsanitizer), which RUSTC_BOOTSTRAP=1 unlocks.
# Corpora start from the committed seeds plus streams the real source engine writes.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-240}
export RUSTC_BOOTSTRAP=1
for t in incoming_file incoming_unix stream_mutate; do
    cargo fuzz build -O "$t"
done
mkdir -p corpus/incoming_file corpus/incoming_unix corpus/stream_mutate
if [ ! -s corpus/incoming_file/snapshot ]; then
    BATON_FUZZ_WRITE_SEEDS=corpus/incoming_file cargo fuzz run -O incoming_file -- -runs=0
    cp corpus/incoming_file/remote-main corpus/incoming_unix/
fi
cp -n seeds/incoming_file/* corpus/incoming_file/ 2>/dev/null || true
cp -n seeds/incoming_unix/* corpus/incoming_unix/ 2>/dev/null || true
cp -n seeds/stream_mutate/* corpus/stream_mutate/ 2>/dev/null || true
# Every crash found so far must stay fixed.
for d in regressions/*/; do
    t=$(basename "$d")
    cargo fuzz run -O "$t" "$d"* -- -runs=1 >/dev/null 2>&1 || { echo "regression in $t"; exit 1; }
done
for t in incoming_file incoming_unix stream_mutate; do
    echo "=== $t for ${secs}s"
    cargo fuzz run -O "$t" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 \
        -print_final_stats=1 2>&1 | tee "fuzz-$t.log" | grep -E "^(#[0-9]+.*(DONE|pulse)|stat::|==|SUMMARY|artifact)" || true
    echo "corpus/$t: $(ls corpus/$t | wc -l) files"
done
