//! The registry's key layout and record formats, version 1. This is the
//! contract with applications outside the mesh (an SDK client registering
//! itself, or reading the mesh's services), so it is documented in the
//! README and changes only with a new version prefix.
//!
//! ```text
//! <prefix>/services/<tenant>/<name>            a service (JSON ServiceRecord)
//! <prefix>/instances/<tenant>/<name>/<id>      an instance (JSON InstanceRecord),
//!                                              written under a lease
//! ```
//!
//! `<prefix>` is `/dataplane/v1` by default. Tenant, name and id are
//! single path segments (no `/`), not empty.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use crate::config::{self, Protocol, TrafficPolicy, UpstreamProtocol};

/// The default key prefix: the layout's version is part of it.
pub const DEFAULT_PREFIX: &str = "/dataplane/v1";

/// What a key names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Service(ServiceId),
    Instance(ServiceId, String),
}

/// A service: its tenant (the mesh's namespace) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId {
    pub tenant: String,
    pub name: String,
}

impl std::fmt::Display for ServiceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.tenant, self.name)
    }
}

/// Why a key or a value was skipped; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("key {key:?} is outside the registry layout ({why})")]
    Layout { key: String, why: &'static str },
    #[error("key {key:?}: {why}")]
    Value { key: String, why: String },
}

/// A service as written in the registry (everything of a config-file
/// service but its name, tenant and endpoints, which come from the key and
/// the instances).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceRecord {
    pub vip: SocketAddrV4,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    #[serde(default)]
    pub traffic_policy: TrafficPolicy,
}

/// An instance as written in the registry. `metadata` is the application's
/// own (an SDK's tags); the mesh keeps it out of routing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InstanceRecord {
    pub address: SocketAddrV4,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

fn default_weight() -> u32 {
    1
}

impl InstanceRecord {
    pub fn endpoint(&self) -> config::Endpoint {
        config::Endpoint {
            address: self.address,
            weight: self.weight,
            region: self.region.clone(),
            zone: self.zone.clone(),
        }
    }
}

/// `<prefix>/services/<tenant>/<name>`.
pub fn service_key(prefix: &str, id: &ServiceId) -> String {
    format!("{prefix}/services/{}/{}", id.tenant, id.name)
}

/// `<prefix>/instances/<tenant>/<name>/<id>`.
pub fn instance_key(prefix: &str, service: &ServiceId, id: &str) -> String {
    format!(
        "{prefix}/instances/{}/{}/{id}",
        service.tenant, service.name
    )
}

/// The prefixes an agent reads: the whole layout, or only what belongs to
/// `tenants` (so that etcd roles may forbid it the rest).
pub fn read_prefixes(prefix: &str, tenants: &[String]) -> Vec<String> {
    if tenants.is_empty() {
        return vec![format!("{prefix}/")];
    }
    tenants
        .iter()
        .flat_map(|t| {
            [
                format!("{prefix}/services/{t}/"),
                format!("{prefix}/instances/{t}/"),
            ]
        })
        .collect()
}

/// Whether a path segment is usable as tenant, name or id.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && s.trim() == s
}

impl Key {
    /// Reads a key under `prefix`.
    pub fn parse(prefix: &str, key: &str) -> Result<Key, RecordError> {
        let layout = |why| RecordError::Layout {
            key: key.to_string(),
            why,
        };
        let rest = key
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| layout("not under the prefix"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        if !parts[1..].iter().all(|p| valid_segment(p)) {
            return Err(layout("an empty or blank segment"));
        }
        let id = |tenant: &str, name: &str| ServiceId {
            tenant: tenant.to_string(),
            name: name.to_string(),
        };
        match parts.as_slice() {
            ["services", tenant, name] => Ok(Key::Service(id(tenant, name))),
            ["instances", tenant, name, instance] => {
                Ok(Key::Instance(id(tenant, name), instance.to_string()))
            }
            ["services" | "instances", ..] => Err(layout("wrong number of segments")),
            _ => Err(layout("neither services/ nor instances/")),
        }
    }
}

/// Parses a JSON value, naming the key in the error.
pub fn parse_value<T: for<'de> Deserialize<'de>>(
    key: &str,
    value: &[u8],
) -> Result<T, RecordError> {
    serde_json::from_slice(value).map_err(|err| RecordError::Value {
        key: key.to_string(),
        why: err.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = DEFAULT_PREFIX;

    fn id(t: &str, n: &str) -> ServiceId {
        ServiceId {
            tenant: t.into(),
            name: n.into(),
        }
    }

    #[test]
    fn keys_round_trip() {
        let svc = id("shop", "cart");
        assert_eq!(
            Key::parse(P, &service_key(P, &svc)),
            Ok(Key::Service(svc.clone()))
        );
        assert_eq!(
            Key::parse(P, &instance_key(P, &svc, "vm-7")),
            Ok(Key::Instance(svc, "vm-7".into()))
        );
    }

    #[test]
    fn keys_outside_the_layout_are_named() {
        for bad in [
            "/other/v1/services/a/b",
            "/dataplane/v1/services/a",
            "/dataplane/v1/services/a/b/c",
            "/dataplane/v1/instances/a/b",
            "/dataplane/v1/instances/a//c",
            "/dataplane/v1/things/a/b",
            "/dataplane/v1services/a/b",
        ] {
            let err = Key::parse(P, bad).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn records_parse_with_defaults_and_reject_garbage() {
        let svc: ServiceRecord = parse_value("k", br#"{"vip": "198.19.0.30:80"}"#).unwrap();
        assert_eq!(svc.protocol, Protocol::Auto);
        assert_eq!(svc.traffic_policy, TrafficPolicy::default());
        let inst: InstanceRecord = parse_value(
            "k",
            br#"{"address": "10.1.0.5:8080", "zone": "a", "metadata": {"version": "2"}}"#,
        )
        .unwrap();
        assert_eq!(inst.weight, 1);
        assert_eq!(inst.endpoint().zone, "a");
        for bad in [
            &b"not json"[..],
            br#"{"address": "10.1.0.300:8080"}"#,
            br#"{"address": "10.1.0.5:8080", "wieght": 2}"#,
        ] {
            let err = parse_value::<InstanceRecord>("/dataplane/v1/instances/a/b/c", bad)
                .expect_err("invalid");
            assert!(err.to_string().contains("/dataplane/v1/instances/a/b/c"));
        }
    }

    #[test]
    fn tenants_narrow_what_is_read() {
        assert_eq!(read_prefixes(P, &[]), ["/dataplane/v1/"]);
        assert_eq!(
            read_prefixes(P, &["a".into()]),
            ["/dataplane/v1/services/a/", "/dataplane/v1/instances/a/"]
        );
    }
}
