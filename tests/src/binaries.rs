//! Finding the binaries the harness starts: the agent and `meshtool`.
//!
//! `cargo xtask test` builds them and sets `DATAPLANE_AGENT_BIN`; otherwise
//! they are looked up next to the running executable (`target/<profile>/`
//! for binaries, its `deps/` subfolder for tests).

use std::path::PathBuf;

use anyhow::{Context as _, bail};

pub fn agent() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("DATAPLANE_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    sibling("dataplane-agent").context("build it with `cargo xtask build`")
}

/// The CNI plugin, built beside the agent.
pub fn cni_plugin() -> anyhow::Result<PathBuf> {
    let path = agent()?.with_file_name("dataplane-cni");
    anyhow::ensure!(
        path.is_file(),
        "{} not found (cargo build -p dataplane-cni)",
        path.display()
    );
    Ok(path)
}

pub fn meshtool() -> anyhow::Result<PathBuf> {
    sibling("meshtool")
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    bail!("{name} not found near {}", exe.display())
}
