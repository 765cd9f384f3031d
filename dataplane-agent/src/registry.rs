//! Discovery from a service registry: an etcd v3 cluster of 3 or 5
//! members, read through a fail-static cache.
//!
//! - [`layout`]: the documented keys and JSON records (the contract with
//!   applications outside the mesh that register or look up services).
//! - [`state`]: the records read, as plain data, and the mesh services
//!   they make.
//! - [`guard`]: large removals held before they apply (bad pushes).
//! - `crate::discovery::snapshot`: the last good state on disk, for a
//!   start while the registry is down.
//! - [`source`]: the etcd client loop (list at a revision, watch from the
//!   next, list again after any failure or compaction), which never drops
//!   what it knows when members fail.
//! - [`register`]: an instance kept registered under a lease.
//!
//! The registry's services join the config file's in the proxy's state
//! (see [`crate::discovery::merge`]); the file keeps the enrolled pods.

pub mod client;
pub mod guard;
pub mod layout;
pub mod metrics;
pub mod publish;
pub mod register;
pub mod source;
pub mod state;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use crate::discovery::{Discovered, Source};

/// The registry as a discovery source: services only (pods are enrolled
/// by the file or by Kubernetes).
pub struct RegistryFeed(pub watch::Receiver<source::Published>);

impl Source for RegistryFeed {
    fn name(&self) -> &'static str {
        "registry"
    }

    fn current(&mut self) -> Arc<Discovered> {
        Arc::new(Discovered {
            services: self
                .0
                .borrow_and_update()
                .iter()
                .cloned()
                .map(Arc::new)
                .collect(),
            ..Discovered::default()
        })
    }

    fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        crate::discovery::changed(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MeshConfig, Service};

    fn services(yaml: &str) -> Vec<Service> {
        MeshConfig::parse(yaml, std::path::Path::new("t"))
            .unwrap()
            .services
            .into_iter()
            .map(std::sync::Arc::unwrap_or_clone)
            .collect()
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
