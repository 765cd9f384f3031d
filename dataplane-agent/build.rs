//! Compiles the eBPF programs (`dataplane-ebpf`) for the bpf target with the
//! nightly toolchain and leaves the object in OUT_DIR, where `capture`
//! embeds it. `cargo xtask setup` installs what this needs.
use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("dataplane-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non UTF-8 path {}", ebpf_dir.display()))?;
    let package = Package {
        name: "dataplane-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
        .context("building the eBPF programs failed; did `cargo xtask setup` run?")
}
