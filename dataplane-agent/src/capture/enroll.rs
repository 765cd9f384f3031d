//! Enrollment: which cgroup ids the capture programs treat as mesh pods.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use dataplane_common::EnrolledPod;

use super::cgroup;
use crate::config::Pod;

/// The enrollment table wanted for `pods`, and the UIDs that have no cgroup
/// (yet) on this node.
#[derive(Debug, Default, PartialEq)]
pub struct Enrollment {
    pub cgroups: HashMap<u64, EnrolledPod>,
    pub absent: BTreeSet<String>,
}

/// Why a pod directory that was found is not enrolled.
#[derive(Debug, PartialEq, Eq)]
pub enum NotEnrolled {
    /// Its cgroup holds the proxy: capturing the proxy's own connections
    /// would loop them back into it.
    ProxyPod,
    /// It went away between finding it and reading its id.
    Gone,
}

/// The cgroup id to enroll for the pod directory `dir`: the one rule for
/// both the periodic walk and a directory that just appeared.
pub fn cgroup_to_enroll(uid: &str, dir: &Path, proxy_cgroup: &Path) -> Result<u64, NotEnrolled> {
    if proxy_cgroup.starts_with(dir) {
        tracing::warn!(%uid, cgroup = %dir.display(), "not enrolling the proxy's own pod");
        return Err(NotEnrolled::ProxyPod);
    }
    cgroup::cgroup_id(dir).map_err(|_| NotEnrolled::Gone)
}

/// The id of a tenant in the kernel tables: a hash of its name (FNV-1a,
/// 32 bits), the same in every agent and across restarts and upgrades, so
/// that two agents sharing the pinned tables agree; 0 is "no tenant". Two
/// tenant names that hash alike would be one tenant to the connect hooks
/// (the proxy compares names and would still refuse their calls).
pub fn tenant_id(tenant: Option<&str>) -> u32 {
    let Some(name) = tenant.filter(|t| !t.is_empty()) else {
        return 0;
    };
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash.max(1)
}

/// Resolves enrolled pods to cgroup ids by walking `pods_root`.
pub fn resolve(pods: &[Pod], pods_root: &Path, proxy_cgroup: &Path) -> Enrollment {
    let found = cgroup::find_pods(pods_root);
    let mut enrollment = Enrollment::default();
    for pod in pods {
        let Some(dir) = found.get(&pod.uid) else {
            enrollment.absent.insert(pod.uid.clone());
            continue;
        };
        match cgroup_to_enroll(&pod.uid, dir, proxy_cgroup) {
            Ok(id) => {
                let tenant = tenant_id(pod.tenant.as_deref());
                enrollment.cgroups.insert(id, EnrolledPod { tenant });
            }
            Err(NotEnrolled::ProxyPod) => {}
            Err(NotEnrolled::Gone) => {
                enrollment.absent.insert(pod.uid.clone());
            }
        }
    }
    enrollment
}
