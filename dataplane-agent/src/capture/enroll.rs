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

/// Resolves enrolled pods to cgroup ids by walking `pods_root`. A pod whose
/// cgroup holds the proxy itself is never enrolled: capturing the proxy's
/// own connections would loop them back into it.
pub fn resolve(pods: &[Pod], pods_root: &Path, proxy_cgroup: &Path) -> Enrollment {
    let found = cgroup::find_pods(pods_root);
    let mut enrollment = Enrollment::default();
    for pod in pods {
        let dir = match found.get(&pod.uid) {
            Some(dir) if !proxy_cgroup.starts_with(dir) => dir,
            Some(dir) => {
                tracing::warn!(uid = %pod.uid, cgroup = %dir.display(), "not enrolling the proxy's own pod");
                continue;
            }
            None => {
                enrollment.absent.insert(pod.uid.clone());
                continue;
            }
        };
        match cgroup::cgroup_id(dir) {
            Ok(id) => {
                enrollment.cgroups.insert(id, EnrolledPod::default());
            }
            // The pod went away between the walk and now.
            Err(_) => {
                enrollment.absent.insert(pod.uid.clone());
            }
        }
    }
    enrollment
}
