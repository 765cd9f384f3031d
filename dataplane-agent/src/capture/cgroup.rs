//! cgroup v2 lookups: where the hierarchy is mounted, which cgroup a
//! process is in, the id the kernel uses for a cgroup, and where kubelet
//! put a pod.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::CaptureError;

/// How deep below the pods' cgroup a pod directory may be. kubelet's
/// cgroupfs driver uses `kubepods/<qos>/pod<uid>`, systemd one level more.
const MAX_POD_DEPTH: usize = 3;

/// Whether a directory `depth` levels below the pods' cgroup (which is at
/// depth 0) that is not itself a pod may hold pod directories, i.e. must
/// be looked into. Pod directories are never looked into: their container
/// cgroups are covered by the pod's enrollment (the programs check every
/// ancestor of the caller's cgroup).
pub fn may_hold_pods(depth: usize) -> bool {
    depth < MAX_POD_DEPTH
}

/// The cgroup v2 mount point, read from /proc/mounts: `/sys/fs/cgroup` on
/// unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf, CaptureError> {
    let mounts =
        std::fs::read_to_string("/proc/mounts").map_err(|source| CaptureError::Cgroup {
            path: "/proc/mounts".into(),
            source,
        })?;
    parse_cgroup2_mount(&mounts).ok_or(CaptureError::NoCgroup2)
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The cgroup v2 directory of this process.
pub fn own_cgroup() -> Result<PathBuf, CaptureError> {
    let err = |source| CaptureError::Cgroup {
        path: "/proc/self/cgroup".into(),
        source,
    };
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(err)?;
    let rel = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| err(std::io::Error::other("no cgroup v2 entry")))?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// Fails unless this process is a member of `dir`: a mistaken proxy cgroup
/// (e.g. `/` seen through a private cgroup namespace) would hook every
/// process of the node.
pub fn check_member(dir: &Path) -> Result<(), CaptureError> {
    let procs = dir.join("cgroup.procs");
    let text = std::fs::read_to_string(&procs).map_err(|source| CaptureError::Cgroup {
        path: procs.clone(),
        source,
    })?;
    let me = std::process::id().to_string();
    if text.lines().any(|pid| pid.trim() == me) {
        return Ok(());
    }
    Err(CaptureError::Cgroup {
        path: dir.to_path_buf(),
        source: std::io::Error::other(format!("process {me} is not in this cgroup")),
    })
}

/// The id `bpf_get_current_cgroup_id()` reports for `dir`: its inode.
pub fn cgroup_id(dir: &Path) -> Result<u64, CaptureError> {
    std::fs::metadata(dir)
        .map(|meta| meta.ino())
        .map_err(|source| CaptureError::Cgroup {
            path: dir.to_path_buf(),
            source,
        })
}

/// The pod UID a kubelet cgroup directory name stands for, if any:
/// `pod<uid>` (cgroupfs driver) or `kubepods-<qos>-pod<uid_with_underscores>.slice`
/// (systemd driver).
pub fn pod_uid_of_dir(name: &str) -> Option<String> {
    if let Some(slice) = name.strip_suffix(".slice") {
        let (_, uid) = slice.rsplit_once("-pod")?;
        return (!uid.is_empty()).then(|| uid.replace('_', "-"));
    }
    let uid = name.strip_prefix("pod")?;
    (!uid.is_empty()).then(|| uid.to_string())
}

/// Finds the cgroup directory of every pod below `pods_root`, by UID.
/// Unreadable subtrees are skipped: pods come and go while we walk.
pub fn find_pods(pods_root: &Path) -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    let mut pending = vec![(pods_root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            match pod_uid_of_dir(&name.to_string_lossy()) {
                Some(uid) => {
                    found.insert(uid, entry.path());
                }
                None if may_hold_pods(depth + 1) => pending.push((entry.path(), depth + 1)),
                None => {}
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_mount_in_a_hybrid_layout() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn pod_dirs_of_both_kubelet_drivers() {
        assert_eq!(pod_uid_of_dir("pod1234-ab").as_deref(), Some("1234-ab"));
        assert_eq!(
            pod_uid_of_dir("kubepods-burstable-pod12_34_ab.slice").as_deref(),
            Some("12-34-ab")
        );
        assert_eq!(pod_uid_of_dir("besteffort"), None);
        assert_eq!(pod_uid_of_dir("kubepods-besteffort.slice"), None);
        assert_eq!(pod_uid_of_dir("pod"), None);
    }

    #[test]
    fn walks_qos_levels_but_not_into_pods() {
        let root = std::env::temp_dir().join(format!("dp-cgtest-{}", std::process::id()));
        for dir in ["burstable/podaaa/ctr", "podbbb/ctr/podnested", "other"] {
            std::fs::create_dir_all(root.join(dir)).expect("mkdir");
        }
        let pods = find_pods(&root);
        std::fs::remove_dir_all(&root).expect("cleanup");
        assert_eq!(pods.len(), 2, "{pods:?}");
        assert_eq!(pods["aaa"], root.join("burstable/podaaa"));
        assert_eq!(pods["bbb"], root.join("podbbb"));
    }
}
