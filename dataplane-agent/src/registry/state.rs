//! What the registry holds, as plain data: records by key, and the mesh
//! services they make. Fed by the etcd source (a listing, then watch
//! events); knows nothing of etcd itself, so it is tested without one.

use std::collections::BTreeMap;

use tracing::warn;

use super::layout::{InstanceRecord, Key, RecordError, ServiceId, ServiceRecord, parse_value};
use crate::config;

/// Every valid record read, by key.
#[derive(Debug, Default, Clone)]
pub struct RegistryState {
    prefix: String,
    services: BTreeMap<ServiceId, ServiceRecord>,
    /// Per service, instance id -> record.
    instances: BTreeMap<ServiceId, BTreeMap<String, InstanceRecord>>,
}

impl RegistryState {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            ..Self::default()
        }
    }

    /// A key was written. A key outside the layout or a value that does not
    /// parse is skipped and the error returned (the caller logs it, naming
    /// the key); a key that held a good value keeps it, as a bad config
    /// file keeps the last good config.
    pub fn put(&mut self, key: &str, value: &[u8]) -> Result<(), RecordError> {
        match Key::parse(&self.prefix, key)? {
            Key::Service(id) => {
                let record: ServiceRecord = parse_value(key, value)?;
                if record.vip.port() == 0 {
                    return Err(RecordError::Value {
                        key: key.to_string(),
                        why: "vip: port 0".into(),
                    });
                }
                self.services.insert(id, record);
            }
            Key::Instance(service, id) => {
                let record: InstanceRecord = parse_value(key, value)?;
                if record.address.port() == 0 || record.weight == 0 {
                    return Err(RecordError::Value {
                        key: key.to_string(),
                        why: "port 0 or weight 0".into(),
                    });
                }
                self.instances
                    .entry(service)
                    .or_default()
                    .insert(id, record);
            }
        }
        Ok(())
    }

    /// A key was deleted (or its lease expired).
    pub fn delete(&mut self, key: &str) {
        match Key::parse(&self.prefix, key) {
            Ok(Key::Service(id)) => {
                self.services.remove(&id);
            }
            Ok(Key::Instance(service, id)) => {
                if let Some(instances) = self.instances.get_mut(&service) {
                    instances.remove(&id);
                    if instances.is_empty() {
                        self.instances.remove(&service);
                    }
                }
            }
            Err(_) => {}
        }
    }

    /// Forgets every record whose key starts with `prefix` (before a fresh
    /// listing of it replaces them).
    pub fn clear_under(&mut self, prefix: &str) {
        let base = self.prefix.clone();
        let under = |key: String| key.starts_with(prefix);
        self.services
            .retain(|id, _| !under(super::layout::service_key(&base, id)));
        for (service, instances) in &mut self.instances {
            instances.retain(|id, _| !under(super::layout::instance_key(&base, service, id)));
        }
        self.instances.retain(|_, instances| !instances.is_empty());
    }

    /// The mesh services: one per service record (its tenant as the
    /// namespace), with its instances as endpoints, ordered by instance id.
    /// Instances of a service with no record are not routable (no VIP) and
    /// left out. Two records claiming one VIP: the first by tenant and name
    /// keeps it, the other is left out with a warning.
    pub fn services(&self) -> Vec<config::Service> {
        let mut vips = std::collections::HashMap::new();
        let mut out = Vec::with_capacity(self.services.len());
        for (id, record) in &self.services {
            if let Some(owner) = vips.insert(record.vip, id) {
                warn!(service = %id, vip = %record.vip, owner = %owner, "registry: VIP already used; service left out");
                vips.insert(record.vip, owner);
                continue;
            }
            let endpoints = self
                .instances
                .get(id)
                .map(|m| m.values().map(InstanceRecord::endpoint).collect())
                .unwrap_or_default();
            out.push(config::Service {
                name: id.name.clone(),
                namespace: id.tenant.clone(),
                vip: record.vip,
                protocol: record.protocol,
                upstream_protocol: record.upstream_protocol,
                endpoints,
                traffic_policy: record.traffic_policy.clone(),
                // Registry tenants scope what a node reads, not who may
                // call whom.
                tenant: String::new(),
                export_to: Vec::new(),
            });
        }
        out
    }

    /// Number of instance records.
    pub fn instance_count(&self) -> usize {
        self.instances.values().map(BTreeMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::layout::DEFAULT_PREFIX as P;

    fn state() -> RegistryState {
        let mut s = RegistryState::new(P);
        s.put(
            "/dataplane/v1/services/shop/cart",
            br#"{"vip": "198.19.0.30:80", "protocol": "http"}"#,
        )
        .unwrap();
        for (id, ip) in [("b", "10.1.0.2"), ("a", "10.1.0.1")] {
            let value = format!(r#"{{"address": "{ip}:8080"}}"#);
            s.put(
                &format!("/dataplane/v1/instances/shop/cart/{id}"),
                value.as_bytes(),
            )
            .unwrap();
        }
        s
    }

    #[test]
    fn records_make_services_with_their_instances() {
        let services = state().services();
        assert_eq!(services.len(), 1);
        let cart = &services[0];
        assert_eq!(
            (cart.namespace.as_str(), cart.name.as_str()),
            ("shop", "cart")
        );
        assert_eq!(cart.protocol, config::Protocol::Http);
        let addrs: Vec<String> = cart
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addrs, ["10.1.0.1:8080", "10.1.0.2:8080"], "ordered by id");
    }

    #[test]
    fn bad_records_are_skipped_and_keep_the_last_good_value() {
        let mut s = state();
        let key = "/dataplane/v1/instances/shop/cart/a";
        assert!(s.put(key, b"{not json").is_err());
        assert!(s.put(key, br#"{"address": "10.1.0.1:0"}"#).is_err());
        assert!(s.put("/dataplane/v1/elsewhere/x", b"{}").is_err());
        assert!(
            s.put(
                "/dataplane/v1/services/shop/cart",
                br#"{"vip": "198.19.0.30:0"}"#
            )
            .is_err()
        );
        assert_eq!(s.services()[0].endpoints.len(), 2, "nothing lost");
    }

    #[test]
    fn deletes_and_instances_without_a_service() {
        let mut s = state();
        s.put(
            "/dataplane/v1/instances/shop/orphan/x",
            br#"{"address": "10.1.0.9:1"}"#,
        )
        .unwrap();
        assert_eq!(s.services().len(), 1, "no record, no VIP: not routable");
        s.delete("/dataplane/v1/instances/shop/cart/a");
        assert_eq!(s.services()[0].endpoints.len(), 1);
        s.delete("/dataplane/v1/services/shop/cart");
        assert!(s.services().is_empty());
    }

    #[test]
    fn a_listing_replaces_what_was_under_its_prefix_only() {
        let mut s = state();
        s.put(
            "/dataplane/v1/services/other/x",
            br#"{"vip": "198.19.0.31:80"}"#,
        )
        .unwrap();
        s.clear_under("/dataplane/v1/instances/shop/");
        let services = s.services();
        assert_eq!(services.len(), 2);
        assert!(services.iter().all(|s| s.endpoints.is_empty()));
    }

    #[test]
    fn a_vip_claimed_twice_goes_to_the_first() {
        let mut s = state();
        s.put(
            "/dataplane/v1/services/zzz/dup",
            br#"{"vip": "198.19.0.30:80"}"#,
        )
        .unwrap();
        let services = s.services();
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].name, "cart");
    }
}
