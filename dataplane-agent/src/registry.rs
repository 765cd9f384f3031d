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

pub mod client;
pub mod guard;
pub mod layout;
pub mod metrics;
pub mod publish;
pub mod register;
pub mod snapshot;
pub mod source;
pub mod state;

use std::collections::HashSet;

use tracing::warn;

use crate::config::{MeshConfig, Service};

/// The config in force: the file's, plus the registry's services whose
/// VIP the file does not use (the file wins a conflict, with a warning;
/// the file's own services read back from the registry, as `--publish`
/// writes them, are no conflict).
pub fn merge(file: &MeshConfig, registry: &[Service]) -> MeshConfig {
    let taken: HashSet<_> = file.services.iter().map(|s| s.vip).collect();
    let own: HashSet<_> = file
        .services
        .iter()
        .map(|s| (s.namespace.as_str(), s.name.as_str(), s.vip))
        .collect();
    let mut merged = file.clone();
    for service in registry {
        if own.contains(&(
            service.namespace.as_str(),
            service.name.as_str(),
            service.vip,
        )) {
            continue;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn services(yaml: &str) -> Vec<Service> {
        MeshConfig::parse(yaml, std::path::Path::new("t"))
            .unwrap()
            .services
    }

    #[test]
    fn the_file_wins_a_vip_and_its_own_published_services_are_no_conflict() {
        let file = MeshConfig::parse(
            "services:\n  - {name: a, vip: 198.19.0.1:80}\n",
            std::path::Path::new("f"),
        )
        .unwrap();
        // Registry services are checked one by one, not as one file.
        let mut registry = services("services:\n  - {name: a, vip: 198.19.0.1:80}\n");
        registry.extend(services(
            "services:\n  - {name: x, namespace: t, vip: 198.19.0.1:80}\n  - {name: b, namespace: t, vip: 198.19.0.2:80}\n",
        ));
        let merged = merge(&file, &registry);
        let names: Vec<&str> = merged.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn published_records_read_back_as_the_same_services() {
        let file = services(
            "services:\n  - name: a\n    namespace: t\n    vip: 198.19.0.1:80\n    protocol: http\n    endpoints: [{address: 10.0.0.1:80, zone: z}, {address: 10.0.0.2:80}]\n",
        );
        let records = publish::records(layout::DEFAULT_PREFIX, &file);
        let mut state = state::RegistryState::new(layout::DEFAULT_PREFIX);
        for (key, value) in &records {
            state.put(key, value.as_bytes()).unwrap();
        }
        assert_eq!(state.services(), file);
        assert!(records.contains_key("/dataplane/v1/instances/t/a/10.0.0.1-80"));
    }
}
