#!/usr/bin/env bash
# Build the CI container image `${COWARENA_CI_IMAGE:-cowarena-ci:local}` FROM scratch, with
# static-pie binaries built on this host (no image is pulled, nothing is downloaded):
#   /usr/local/bin/{cowarena,demo,container_check}  and  /cowarena-tests/<integration tests>
# Uses $CARGO_TARGET_DIR (default: target). Prints two lines on stdout (all else goes to
# stderr): `image=<tag>` and `tests=<names of the test binaries in /cowarena-tests>`.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
IMAGE=${COWARENA_CI_IMAGE:-cowarena-ci:local}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
export RUSTFLAGS="-C target-feature=+crt-static"

if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$TARGET"; then
  echo "build-image: rust target $TARGET is not installed (rustup target add $TARGET)" >&2
  exit 1
fi

# Executables from cargo's JSON messages: "<target name> <path>" per line.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["target"]["kind"][0], m["executable"])
'
}

echo "build-image: static binaries for $TARGET (RUSTFLAGS=$RUSTFLAGS)" >&2
bins=$(cargo build --release --target "$TARGET" --bin cowarena --example demo --example container_check \
  --message-format=json | executables)
tests=$(cargo test --release --target "$TARGET" --no-run --lib --tests --message-format=json | executables)

ctx="$TARGET_DIR/docker-ci-context"
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/cowarena-tests" "$ctx/rootfs/tmp"
chmod 1777 "$ctx/rootfs/tmp"
cp docker/Dockerfile.ci "$ctx/Dockerfile"
while read -r name kind path; do
  [ -n "$name" ] || continue
  cp "$path" "$ctx/rootfs/usr/local/bin/$name"
done <<<"$bins"
while read -r name kind path; do
  [ -n "$name" ] || continue
  case "$name" in docker) continue ;; esac # the container tests themselves run on the host
  # `--lib` gives kind "lib": the unit tests of the library.
  [ "$kind" = bin ] && continue # the CLI has no tests of its own
  [ "$kind" = lib ] && name=unit
  cp "$path" "$ctx/rootfs/cowarena-tests/$name"
done <<<"$tests"

# Every binary must be static: a FROM scratch image has no loader and no libc.
for f in "$ctx"/rootfs/usr/local/bin/* "$ctx"/rootfs/cowarena-tests/*; do
  if readelf -l "$f" | grep -q "Requesting program interpreter"; then
    echo "build-image: $f is dynamically linked" >&2
    exit 1
  fi
done
ls "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/cowarena-tests" >&2

# The legacy builder needs no buildx plugin and pulls nothing for FROM scratch.
DOCKER_BUILDKIT=0 docker build -q -t "$IMAGE" "$ctx" >&2
echo "image=$IMAGE"
echo "tests=$(ls "$ctx/rootfs/cowarena-tests" | tr '\n' ' ')"
