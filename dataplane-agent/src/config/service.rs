//! A service port as configured: VIP, protocol, endpoints and policy.

use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use super::TrafficPolicy;

/// One service port: a VIP:port and the endpoints that serve it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", try_from = "RawService")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vip: SocketAddrV4,
    pub protocol: Protocol,
    /// The HTTP version requests are sent to the endpoints in.
    pub upstream_protocol: UpstreamProtocol,
    pub endpoints: Vec<Endpoint>,
    pub traffic_policy: TrafficPolicy,
    /// The tenant owning the service; empty: none, every enrolled pod may
    /// call it. A tenant's service may be called by that tenant's pods and
    /// by the tenants of `export_to`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// Other tenants that may call the service; `*`: every one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

impl Service {
    /// Whether a pod of `caller` (its tenant; `None`: no tenant, or a
    /// caller the proxy cannot identify) may call this service.
    pub fn admits(&self, caller: Option<&str>) -> bool {
        self.tenant.is_empty()
            || caller == Some(self.tenant.as_str())
            || self
                .export_to
                .iter()
                .any(|t| t == "*" || Some(t.as_str()) == caller)
    }
}

/// The HTTP version the endpoints are spoken to in; requests are
/// translated (HTTP/1.1 <-> HTTP/2) when it differs from the client's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum UpstreamProtocol {
    /// The version the client spoke (gRPC stays HTTP/2 end to end).
    #[default]
    Auto,
    /// HTTP/1.1 only: for backends without HTTP/2 (most web servers
    /// without TLS), so that HTTP/2 and gRPC-web clients can still call them.
    Http1,
    /// HTTP/2 with prior knowledge (h2c): multiplexes every request to an
    /// endpoint on one connection.
    Http2,
}

/// What the service speaks, which decides how the proxy handles it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Protocol {
    /// Opaque bytes: zero-copy forwarding, connection-level policy only.
    Tcp,
    /// HTTP/1.1 or HTTP/2 (h2c): request-level policy.
    Http,
    /// Decide per connection from the first bytes (HTTP/1 request line or
    /// the HTTP/2 preface); anything else is handled as TCP.
    #[default]
    Auto,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawService {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    vip: SocketAddrV4,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    upstream_protocol: UpstreamProtocol,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
    #[serde(default)]
    traffic_policy: TrafficPolicy,
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    export_to: Vec<String>,
}

fn default_namespace() -> String {
    "default".to_string()
}

/// An instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Endpoint {
    pub address: SocketAddrV4,
    /// Relative share of traffic (default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Locality, for locality-aware failover (empty = unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
}

fn default_weight() -> u32 {
    1
}

impl TryFrom<RawService> for Service {
    type Error = String;

    fn try_from(raw: RawService) -> Result<Self, String> {
        if raw.name.trim().is_empty() {
            return Err("name: must not be empty".into());
        }
        if raw.vip.port() == 0 {
            return Err("vip: port must not be 0".into());
        }
        for (i, ep) in raw.endpoints.iter().enumerate() {
            if ep.address.port() == 0 {
                return Err(format!("endpoints[{i}].address: port must not be 0"));
            }
            if ep.weight == 0 {
                return Err(format!("endpoints[{i}].weight: must be at least 1"));
            }
        }
        if let Some(bad) = raw.export_to.iter().find(|t| t.trim().is_empty()) {
            return Err(format!("exportTo: {bad:?} is not a tenant name"));
        }
        if raw.tenant.is_empty() && !raw.export_to.is_empty() {
            return Err("exportTo: only a service with a tenant is exported".into());
        }
        Ok(Self {
            name: raw.name,
            namespace: raw.namespace,
            vip: raw.vip,
            protocol: raw.protocol,
            upstream_protocol: raw.upstream_protocol,
            endpoints: raw.endpoints,
            traffic_policy: raw.traffic_policy,
            tenant: raw.tenant,
            export_to: raw.export_to,
        })
    }
}
