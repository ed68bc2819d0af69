#!/usr/bin/env bash
# Runs cargo-fuzz targets for a while each: fuzz/run.sh [SECONDS] [TARGET...]
# (default: 60 s each for config, classify and replay_headers). Seeds come from
# fuzz/seeds/TARGET; new inputs go to fuzz/corpus/TARGET, crashes to fuzz/artifacts/.
# cargo-fuzz needs -Z flags: RUSTC_BOOTSTRAP=1 lets a stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config classify replay_headers)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "== fuzzing $t for ${seconds}s"
    RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- -max_total_time="$seconds"
done
