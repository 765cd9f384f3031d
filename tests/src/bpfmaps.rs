//! Reading the agent's pinned eBPF maps from a test, with `bpftool`.
//!
//! Tests use it to prove that no per-connection entry leaks
//! (`DP_ORIG_DST`, `DP_CONNS`): the agent exports counters, not the
//! number of entries in those maps, and a leak only shows as entries that
//! stay.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::proc::run_with_timeout;

/// Bound on one `bpftool` run (a dump of a few entries takes milliseconds).
const BPFTOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// The pinned map `name` under an agent's `pin_dir`. The agent keeps maps
/// in a directory named after their layout version (`maps-v<n>`); there is
/// exactly one while a single agent version ran, which the tests ensure.
pub fn pinned_map(pin_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(pin_dir)
        .with_context(|| format!("reading pin directory {}", pin_dir.display()))?;
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("maps"))
        })
        .map(|e| e.path().join(name))
        .filter(|path| path.exists())
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!("no pinned map {name} under {}", pin_dir.display()),
        _ => bail!("map {name} is pinned in several layouts: {found:?}"),
    }
}

/// How many entries the pinned map at `path` holds (`bpftool map dump`).
pub fn entry_count(path: &Path) -> anyhow::Result<usize> {
    Ok(dump(path)?.len())
}

/// The keys of the pinned map at `path`, each read as a native-endian
/// `u64` (e.g. the cgroup ids in `DP_ENROLLED`).
pub fn u64_keys(path: &Path) -> anyhow::Result<Vec<u64>> {
    dump(path)?
        .iter()
        .map(|entry| {
            let bytes = entry["key"]
                .as_array()
                .with_context(|| format!("no key bytes in {entry}"))?
                .iter()
                .map(|byte| {
                    let hex = byte.as_str().unwrap_or_default();
                    u8::from_str_radix(hex.trim_start_matches("0x"), 16)
                        .with_context(|| format!("bad key byte {byte} in {entry}"))
                })
                .collect::<anyhow::Result<Vec<u8>>>()?;
            let key: [u8; 8] = bytes
                .try_into()
                .map_err(|bytes| anyhow::anyhow!("key of {} bytes, not 8", Vec::len(&bytes)))?;
            Ok(u64::from_ne_bytes(key))
        })
        .collect()
}

/// `bpftool map dump` of the pinned map at `path`: one JSON object per
/// entry, with the key's and the value's bytes.
fn dump(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "map", "dump", "pinned"]).arg(path);
    let out = run_with_timeout(cmd, BPFTOOL_TIMEOUT)
        .context("running bpftool (installed by `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "bpftool map dump {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text).with_context(|| format!("bpftool printed no JSON array: {text:?}"))
}

/// Entries in the agent's map `name` (e.g. `DP_CONNS`).
pub fn agent_map_entries(pin_dir: &Path, name: &str) -> anyhow::Result<usize> {
    entry_count(&pinned_map(pin_dir, name)?)
}

/// The shape of a pinned map, as `bpftool map show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapShape {
    pub id: u64,
    /// bpftool's name of the type, e.g. `hash`, `lru_hash`.
    pub kind: String,
    pub key_size: u64,
    pub value_size: u64,
    pub max_entries: u64,
}

/// `bpftool map show pinned <path>`.
pub fn map_shape(path: &Path) -> anyhow::Result<MapShape> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "map", "show", "pinned"]).arg(path);
    let out = run_with_timeout(cmd, BPFTOOL_TIMEOUT).context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map show {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let map: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool printed no JSON for {}", path.display()))?;
    let number = |field: &str| {
        map[field]
            .as_u64()
            .with_context(|| format!("no {field} in {map}"))
    };
    Ok(MapShape {
        id: number("id")?,
        kind: map["type"].as_str().unwrap_or_default().to_string(),
        key_size: number("bytes_key")?,
        value_size: number("bytes_value")?,
        max_entries: number("max_entries")?,
    })
}

/// Creates a map with `bpftool map create` and pins it at `path` (which
/// must be on bpffs), e.g. to stand for a map another release left there.
pub fn create_pinned_map(
    path: &Path,
    name: &str,
    kind: &str,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> anyhow::Result<()> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", "create"]).arg(path);
    let sizes = [key_size, value_size, max_entries].map(|n| n.to_string());
    cmd.args(["type", kind, "key", &sizes[0], "value", &sizes[1]])
        .args(["entries", &sizes[2], "name", name]);
    let out = run_with_timeout(cmd, BPFTOOL_TIMEOUT).context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map create {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
