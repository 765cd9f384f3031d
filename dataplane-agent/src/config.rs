//! The mesh state of the node as read from a YAML file: the services the
//! proxy serves and the pods enrolled in the mesh.
//!
//! The file is one discovery source; the registry (`crate::registry`)
//! adds services to it. Node wiring (addresses, cgroups, pin paths) is not
//! here but in the command line, like a DaemonSet's args.
//!
//! Parsing is strict: unknown fields, wrong types and invalid addresses are
//! errors that name the field and line, because a silently ignored typo in
//! a mesh config is an outage that is hard to find.

mod policy;
mod service;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};

pub use policy::{DEFAULT_IDLE, Fallback, TrafficPolicy};
pub use service::{Endpoint, Protocol, Service, UpstreamProtocol};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `message` comes from the YAML parser and names the field (as a path
    /// like `services[0].vip`) and the line and column.
    #[error("invalid config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshConfig {
    /// Mesh services, each reachable at a virtual IP and port.
    /// Shared: a large discovered state is held once however many views
    /// of it (the merged config, the admin endpoint, the proxy's table)
    /// there are, and an unchanged service is recognised by its pointer.
    #[serde(default, deserialize_with = "unique_services")]
    pub services: Vec<Arc<Service>>,
    /// Pods enrolled in the mesh: their outbound connections to services are
    /// captured and sent to the node proxy.
    #[serde(default, deserialize_with = "unique_pods")]
    pub pods: Vec<Pod>,
}

/// A pod enrolled in the mesh, found by its UID in the pods' cgroup tree.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pod {
    pub uid: String,
    /// For logs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The pod's address: lets the proxy tell which pod is calling (for
    /// per-pod rate limits and priority classes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::Ipv4Addr>,
    /// The pod's tenant (see `Service::tenant`); none: it may call only
    /// services without a tenant or exported to every tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Two services on one VIP:port would make capture ambiguous.
fn unique_services<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<Arc<Service>>, D::Error> {
    let services = Vec::<Arc<Service>>::deserialize(de)?;
    let mut seen = HashSet::new();
    for (i, svc) in services.iter().enumerate() {
        if !seen.insert(svc.vip) {
            return Err(serde::de::Error::custom(format!(
                "services[{i}].vip: {} is used by another service",
                svc.vip
            )));
        }
    }
    Ok(services)
}

fn unique_pods<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<Pod>, D::Error> {
    let pods = Vec::<Pod>::deserialize(de)?;
    let mut seen = HashSet::new();
    for (i, pod) in pods.iter().enumerate() {
        if pod.uid.trim().is_empty() {
            return Err(serde::de::Error::custom(format!(
                "pods[{i}].uid: must not be empty"
            )));
        }
        if !seen.insert(pod.uid.as_str()) {
            return Err(serde::de::Error::custom(format!(
                "pods[{i}].uid: {} is listed twice",
                pod.uid
            )));
        }
    }
    Ok(pods)
}

impl MeshConfig {
    /// Parses YAML text; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        serde_yaml_ng::from_str(text).map_err(|err| ConfigError::Invalid {
            path: origin.to_path_buf(),
            message: err.to_string(),
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests;
