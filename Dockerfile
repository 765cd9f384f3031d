# syntax=docker/dockerfile:1
#
# The node agent's image, for deploy/base:
#
#   docker build -t dataplane-agent:0.1.0 .
#
# Not built yet: no image has been built from this file so far. Its build
# stage repeats what `cargo xtask setup` does for the build (a nightly with
# rust-src, bpf-linker linked to that nightly's LLVM) and a release build,
# which are what the project's own checks run; the base image tags below
# are assumed to exist, not checked.

# Both stages on the same Debian release: the binary links the build
# stage's glibc.
ARG DEBIAN=trixie

FROM rust:1.95-${DEBIAN} AS build

# Keep equal to BPF_LINKER_VERSION in xtask/src/setup.rs (a test checks).
ARG BPF_LINKER_VERSION=0.13.0
# A dated nightly, so that the image builds the same way tomorrow: its
# LLVM (22) must be one that bpf-linker above supports.
ARG NIGHTLY=nightly-2026-05-20

# The eBPF crate builds `core` for the bpf target: nightly with rust-src.
# aya-build (the agent's build script) runs the toolchain named `nightly`,
# and rustup refuses to link a custom toolchain under that name, so the
# dated toolchain's directory is given the name instead.
RUN set -eu; \
    rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src; \
    host="$(rustc -vV | sed -n 's/^host: //p')"; \
    mv "$RUSTUP_HOME/toolchains/$NIGHTLY-$host" "$RUSTUP_HOME/toolchains/nightly-$host"; \
    rustc +nightly -vV

# bpf-linker built against the LLVM inside that nightly, so that it always
# reads the bitcode rustc emits (as xtask/src/setup.rs does it):
# LLVM_PREFIX/lib holds libLLVM.so for the build and the library's own
# name (its soname) for the loader.
RUN set -eu; \
    sysroot="$(rustc +nightly --print sysroot)"; \
    lib="$(ls "$sysroot"/lib/libLLVM.so.*)"; \
    major="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"; \
    mkdir -p /opt/llvm/lib; \
    ln -s "$lib" /opt/llvm/lib/libLLVM.so; \
    ln -s "$lib" "/opt/llvm/lib/$(basename "$lib")"; \
    LLVM_PREFIX=/opt/llvm cargo install bpf-linker --locked \
        --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-$major"; \
    bpf-linker --version

# protoc: the etcd client's build compiles etcd's gRPC definitions.
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
# The agent (its build script compiles and embeds the eBPF programs) with
# the stable toolchain, as `cargo xtask build` does. The target directory
# is a cache mount, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dataplane-agent \
    && cp target/release/dataplane-agent /usr/local/bin/dataplane-agent \
    && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
        -p dataplane-cni --target x86_64-unknown-linux-gnu \
    && cp target/x86_64-unknown-linux-gnu/release/dataplane-cni /usr/local/bin/dataplane-cni

# Runtime: the binary alone on a slim Debian. Not distroless: the
# DaemonSet's start-up script and bpffs check need /bin/sh, find, grep, tr
# and stat. No USER: the agent needs uid 0 to keep the capabilities the
# DaemonSet grants (Kubernetes sets no ambient capabilities).
FROM debian:${DEBIAN}-slim
COPY --from=build /usr/local/bin/dataplane-agent /usr/local/bin/dataplane-agent
# The CNI plugin, which the agent copies onto the node (--cni-bin-dir) and
# the container runtime runs there, outside this image: linked statically
# (it is std-only), so that it runs whatever the node's C library.
COPY --from=build /usr/local/bin/dataplane-cni /usr/local/bin/dataplane-cni
ENTRYPOINT ["dataplane-agent"]
CMD ["--help"]
