# cowarena in a container (see docs/containers.md).
#
#   docker build -t cowarena .                     # runtime image: runs the demo
#   docker run --rm --security-opt seccomp=cowarena-seccomp.json cowarena
#   docker run --rm --device /dev/userfaultfd cowarena        # Linux 6.1+
#   docker run --rm --device /dev/userfaultfd cowarena cowarena doctor
#
#   docker build --target test -t cowarena-test .  # the test suite (cargo test --release)
#   docker run --rm --device /dev/userfaultfd cowarena-test
#
# userfaultfd is blocked by Docker's default seccomp profile: every `docker run` needs the
# shipped profile or the device, including the test image's (RUN steps of a build cannot
# use userfaultfd, so the tests run at `docker run` time, not at build time).
#
# Builder and runtime share one Debian release so the glibc the binaries link against is
# the one they run with.
ARG DEBIAN=bookworm

FROM rust:1-${DEBIAN} AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin cowarena --example demo --example container_check \
 && mkdir -p /out \
 && cp target/release/cowarena target/release/examples/demo target/release/examples/container_check /out/

# `docker build --target test`: the full test suite, compiled at build time, run by `docker run`.
FROM builder AS test
RUN cargo test --release --locked --no-run
CMD ["cargo", "test", "--release", "--locked"]

# Default target: the demo, the doctor and the semantic check, nothing else.
FROM debian:${DEBIAN}-slim AS runtime
COPY --from=builder /out/ /usr/local/bin/
COPY cowarena-seccomp.json /usr/local/share/cowarena/cowarena-seccomp.json
CMD ["demo"]
