//! Discovery from a service registry: an etcd v3 cluster of 3 or 5
//! members, read through a fail-static cache.
//!
//! - [`layout`]: the documented keys and JSON records (the contract with
//!   applications outside the mesh that register or look up services).
//! - [`state`]: the records read, as plain data, and the mesh services
//!   they make.
//! - [`guard`]: large removals held before they apply (bad pushes).
//! - [`snapshot`]: the last good state on disk, for a start while the
//!   registry is down.
//! - [`source`]: the etcd client loop (list at a revision, watch from the
//!   next, list again after any failure or compaction), which never drops
//!   what it knows when members fail.
//! - [`register`]: an instance kept registered under a lease.
//!
//! The registry's services join the config file's in the proxy's state
//! (see [`merge`]); the file keeps the enrolled pods.

pub mod guard;
pub mod layout;
pub mod metrics;
pub mod register;
pub mod snapshot;
pub mod source;
pub mod state;

use std::collections::HashSet;

use tracing::warn;

use crate::config::{MeshConfig, Service};

/// The config in force: the file's, plus the registry's services whose
/// VIP the file does not use (the file wins a conflict, with a warning).
pub fn merge(file: &MeshConfig, registry: &[Service]) -> MeshConfig {
    let taken: HashSet<_> = file.services.iter().map(|s| s.vip).collect();
    let mut merged = file.clone();
    for service in registry {
        if taken.contains(&service.vip) {
            warn!(
                service = %format!("{}/{}", service.namespace, service.name),
                vip = %service.vip,
                "registry service left out: the config file uses its VIP"
            );
            continue;
        }
        merged.services.push(service.clone());
    }
    merged
}
