//! Unique names for nodes and pods.
//!
//! Namespaces and cgroups are global to the machine, and tests run in
//! parallel threads and in parallel processes (`cargo test` runs test
//! binaries one by one, but CI and developers may run several at once), so
//! every name embeds the process id and a per-process counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure};

/// Longest accepted node hint; keeps names short and readable.
pub const MAX_HINT_LEN: usize = 8;

/// Longest accepted pod name (it is used in the pod's netns name).
pub const MAX_POD_NAME_LEN: usize = 24;

static NEXT_NODE: AtomicU64 = AtomicU64::new(0);
static NEXT_UID: AtomicU64 = AtomicU64::new(0);

/// A fresh node id `<hint>-<pid>-<n>`, unique on this machine while this
/// process lives.
pub(crate) fn node_id(hint: &str) -> anyhow::Result<String> {
    ensure!(
        !hint.is_empty() && hint.len() <= MAX_HINT_LEN,
        "node hint {hint:?} must be 1..={MAX_HINT_LEN} characters"
    );
    ensure!(
        hint.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "node hint {hint:?} may only contain a-z and 0-9"
    );
    let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
    Ok(format!("{hint}-{}-{n}", std::process::id()))
}

/// Checks a pod name: DNS-label-like, short, and not `node` (which names
/// the node namespace).
pub(crate) fn check_pod_name(name: &str) -> anyhow::Result<()> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let edges_ok = !name.starts_with('-') && !name.ends_with('-');
    if name.is_empty() || name.len() > MAX_POD_NAME_LEN || !valid_chars || !edges_ok {
        bail!(
            "pod name {name:?} must be 1..={MAX_POD_NAME_LEN} of a-z, 0-9, '-' (not at the ends)"
        );
    }
    ensure!(
        name != "node",
        "pod name \"node\" is reserved for the node namespace"
    );
    Ok(())
}

/// A UUID-shaped (version 4 layout) string, unique per process and
/// practically unique across processes: it mixes pid, a counter and the
/// clock. Real pods have UUIDs; the agent must cope with that shape.
pub(crate) fn pod_uid() -> String {
    let n = NEXT_UID.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let seed = u64::from(std::process::id()) << 32 ^ n;
    let hi = splitmix64(seed ^ nanos);
    let lo = splitmix64(hi ^ n.rotate_left(17));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0x0fff,
        0x8000 | ((lo >> 48) & 0x3fff),
        lo & 0xffff_ffff_ffff
    )
}

/// SplitMix64 finaliser: a cheap, well-mixing bijection on u64.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_unique_and_validated() {
        let a = node_id("t").expect("valid hint");
        let b = node_id("t").expect("valid hint");
        assert_ne!(a, b);
        assert!(node_id("").is_err());
        assert!(node_id("TooLongHint").is_err());
        assert!(node_id("a-b").is_err());
    }

    #[test]
    fn pod_names_are_checked() {
        assert!(check_pod_name("client-1").is_ok());
        assert!(check_pod_name("node").is_err());
        assert!(check_pod_name("-a").is_err());
        assert!(check_pod_name("A").is_err());
        assert!(check_pod_name("").is_err());
    }

    #[test]
    fn pod_uids_look_like_uuids() {
        let uid = pod_uid();
        let parts: Vec<usize> = uid.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{uid}");
        assert_ne!(uid, pod_uid());
    }
}
