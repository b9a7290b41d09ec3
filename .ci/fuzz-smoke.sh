#!/usr/bin/env bash
# Bounded fuzzing smoke for CI: the cargo-fuzz target fuzz/fuzz_targets/ops.rs (operation
# sequences checked against a reference model) for FUZZ_SECONDS (default 60) seconds, then
# fuzz_targets/image.rs (the image loader) for FUZZ_IMAGE_SECONDS (default 20).
# Installs cargo-fuzz if missing (~35 s), builds (~50 s), fuzzes: ~2.5 minutes in all on a
# 2-vCPU machine. Exits non-zero on any crash, divergence, leak, invariant violation or hang;
# the reproducer is then in fuzz/artifacts/ops/ (see fuzz/README.md to replay and minimise).
# Needs a nightly toolchain (rustup) and userfaultfd (run as root, as .ci/run is).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export CARGO_TERM_COLOR=never

secs="${FUZZ_SECONDS:-60}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"

if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
  echo "fuzz-smoke: no '$toolchain' Rust toolchain (rustup toolchain install $toolchain)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# A corpus kept between runs (if the CI machine keeps fuzz/corpus) only helps; none is needed.
# fuzz/regressions/ holds inputs that once failed (committed): they run first, every time.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# fuzz TARGET SECONDS CORPUS... -- LIBFUZZER-FLAGS...: run one target, fail loudly with the
# reproducers on any crash, hang or leak.
fuzz() {
  local target="$1" secs="$2" rc runs
  shift 2
  mkdir -p "corpus/$target"
  set +e
  cargo "+$toolchain" fuzz run "$target" "corpus/$target" "$@" -max_total_time="$secs" -rss_limit_mb=4096 \
    -timeout=30 -print_final_stats=1 2>&1 | tee "$log" | grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)|# Uses: [0-9]+$'
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "fuzz-smoke: $target FAILED (exit $rc); reproducer(s):" >&2
    ls -l "artifacts/$target/" >&2 || true
    exit "$rc"
  fi
  runs=$(grep -oE '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1)
  echo "fuzz-smoke: $target: ok: ${runs:-?}s, no crash"
}

# -timeout: an input running 30 s is a hang (e.g. a fault never served) and fails the run.
# -max_len/-len_control=0: long operation sequences from the start (libFuzzer's default
# grows the length limit slowly, which would keep a one-minute run at a few operations).
fuzz ops "$secs" regressions -- -max_len=2048 -len_control=0

# The image loader (fuzz_targets/image.rs): damaged and foreign files given to Arena::load.
fuzz image "${FUZZ_IMAGE_SECONDS:-20}" -- -max_len=512
