//! Kubernetes objects to the mesh's plain data: Services and their
//! EndpointSlices to [`config::Service`]s (one per service port), this
//! node's Pods in enrolled namespaces to [`config::Pod`]s. Pure functions
//! of what the watches hold, so they are tested on recorded objects
//! without an API server.
//!
//! What cannot be converted is left out and reported as a [`Skipped`]
//! naming the object and the field; the rest converts as usual, as a bad
//! line in the config file never takes the good ones with it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};

use crate::config::{self, Protocol, TrafficPolicy, UpstreamProtocol};

/// The label (on a namespace) or annotation (on a pod, overriding its
/// namespace) that enrolls pods in the mesh: `"true"` or `"false"`.
pub const ENROLLED: &str = "mesh.sidecarless.dev/enrolled";

/// The namespace label naming the tenant its pods and services belong to
/// (none: no tenant; see `config::Service::tenant`).
pub const TENANT: &str = "mesh.sidecarless.dev/tenant";

/// The Service annotation listing, comma-separated, the other tenants that
/// may call it, or `*` for all.
pub const EXPORT_TO: &str = "mesh.sidecarless.dev/export-to";

/// The label EndpointSlices name their Service by.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An object, or a part of one, left out of the mesh state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Skipped {
    /// Kind and namespace/name, e.g. `Service shop/cart`.
    pub object: String,
    /// The field at fault, as a path into the object.
    pub field: String,
    pub why: String,
    /// Invalid data (logged as a warning and counted), rather than a valid
    /// object the mesh does not serve, such as a UDP port or an IPv6 slice
    /// (logged at debug level).
    pub invalid: bool,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.why)
    }
}

/// The mesh services of one Service (one per TCP port) with the endpoints
/// of its `slices`, in its namespace's `tenant`, under `policy`.
pub fn service(
    service: &Service,
    slices: &[&Slice],
    tenant: &str,
    policy: Option<&TrafficPolicy>,
    skipped: &mut Vec<Skipped>,
) -> Vec<config::Service> {
    let (Some(namespace), Some(name)) = (
        service.metadata.namespace.as_deref(),
        service.metadata.name.as_deref(),
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    convert_service(service, namespace, name, slices, skipped, &mut out);
    let export_to = export_to(service, tenant, skipped);
    for converted in &mut out {
        converted.tenant = tenant.to_string();
        converted.export_to.clone_from(&export_to);
        if let Some(policy) = policy {
            converted.traffic_policy = policy.clone();
        }
    }
    out
}

/// What conversion reads of an EndpointSlice: kept instead of the object,
/// which costs several times as much per endpoint (a cluster of 100,000
/// endpoints is held in a few megabytes).
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to (its [`SERVICE_NAME_LABEL`]).
    pub owner: Option<String>,
    pub address_type: String,
    /// Name and number of each port.
    pub ports: Vec<(String, Option<i32>)>,
    /// Empty for an address type that is not served.
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of a [`Slice`].
#[derive(Debug, Clone, PartialEq)]
pub struct SliceEndpoint {
    /// Its first address.
    pub address: Address,
    pub conditions: Option<EndpointConditions>,
    pub zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Address {
    V4(Ipv4Addr),
    /// Not an IPv4 address: kept to say so.
    Invalid(Box<str>),
    Missing,
}

impl Slice {
    /// `namespace/name` of the Service it belongs to.
    pub fn owner_key(&self) -> Option<String> {
        let owner = self.owner.as_deref()?;
        Some(format!("{}/{owner}", self.namespace))
    }
}

impl From<EndpointSlice> for Slice {
    fn from(slice: EndpointSlice) -> Self {
        let meta = slice.metadata;
        let served = slice.address_type == "IPv4";
        // Built into new vectors: collecting in place would keep the
        // object's (several times larger) allocations alive.
        let ports = slice
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name.unwrap_or_default(), p.port));
        let endpoints = slice
            .endpoints
            .into_iter()
            .filter(|_| served)
            .map(|e| SliceEndpoint {
                address: match e.addresses.first() {
                    None => Address::Missing,
                    Some(a) => a
                        .parse()
                        .map_or_else(|_| Address::Invalid(a.as_str().into()), Address::V4),
                },
                conditions: e.conditions,
                zone: e.zone,
            });
        Self {
            namespace: meta.namespace.unwrap_or_default(),
            name: meta.name.unwrap_or_default(),
            owner: meta.labels.and_then(|mut l| l.remove(SERVICE_NAME_LABEL)),
            address_type: slice.address_type,
            ports: exact(ports),
            endpoints: exact(endpoints),
        }
    }
}

/// A vector of exactly the items of `items`, in an allocation of its own
/// (never the source's, as collecting a vector's items in place does).
pub fn exact<T>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    out.extend(items);
    out.shrink_to_fit();
    out
}

fn convert_service(
    service: &Service,
    namespace: &str,
    name: &str,
    slices: &[&Slice],
    skipped: &mut Vec<Skipped>,
    out: &mut Vec<config::Service>,
) {
    let object = format!("Service {namespace}/{name}");
    let skip = |skipped: &mut Vec<Skipped>, field: String, why: String, invalid: bool| {
        skipped.push(Skipped {
            object: object.clone(),
            field,
            why,
            invalid,
        });
    };
    let Some(spec) = &service.spec else { return };
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }
    let Some(vip) = cluster_ipv4(spec.cluster_ip.as_deref(), spec.cluster_ips.as_deref()) else {
        match spec.cluster_ip.as_deref() {
            // Headless: clients connect to pod addresses, not a VIP.
            None | Some("None") | Some("") => {}
            Some(other) => skip(
                skipped,
                "spec.clusterIPs".into(),
                format!("no IPv4 cluster IP ({other}); only IPv4 VIPs are served"),
                false,
            ),
        }
        return;
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    for (i, port) in ports.iter().enumerate() {
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            skip(
                skipped,
                format!("spec.ports[{i}].protocol"),
                format!(
                    "{}: only TCP is proxied",
                    port.protocol.as_deref().unwrap_or_default()
                ),
                false,
            );
            continue;
        }
        let Some(number) = port_number(port.port) else {
            skip(
                skipped,
                format!("spec.ports[{i}].port"),
                format!("{} is not a port number (1-65535)", port.port),
                true,
            );
            continue;
        };
        let (protocol, upstream_protocol) = protocol_of(port);
        let port_name = port.name.as_deref().unwrap_or_default();
        let endpoints = endpoints_for(port_name, slices, skipped);
        out.push(config::Service {
            name: if ports.len() == 1 {
                name.to_string()
            } else if port_name.is_empty() {
                format!("{name}:{number}")
            } else {
                format!("{name}:{port_name}")
            },
            namespace: namespace.to_string(),
            vip: SocketAddrV4::new(vip, number),
            protocol,
            upstream_protocol,
            endpoints,
            traffic_policy: TrafficPolicy::default(),
            tenant: String::new(),
            export_to: Vec::new(),
        });
    }
}

/// The tenants a Service is exported to, from its [`EXPORT_TO`]
/// annotation; only a tenant's Service can be exported.
fn export_to(service: &Service, tenant: &str, skipped: &mut Vec<Skipped>) -> Vec<String> {
    let Some(list) = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXPORT_TO))
    else {
        return Vec::new();
    };
    if tenant.is_empty() {
        skipped.push(Skipped {
            object: format!(
                "Service {}/{}",
                service.metadata.namespace.as_deref().unwrap_or_default(),
                service.metadata.name.as_deref().unwrap_or_default()
            ),
            field: format!("metadata.annotations[{EXPORT_TO}]"),
            why: "its namespace has no tenant: every enrolled pod may call it already".into(),
            invalid: false,
        });
        return Vec::new();
    }
    list.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Each namespace's tenant, from its [`TENANT`] label.
pub fn namespace_tenants<'a>(
    namespaces: impl IntoIterator<Item = &'a Namespace>,
) -> BTreeMap<String, String> {
    namespaces
        .into_iter()
        .filter_map(|ns| {
            let name = ns.metadata.name.clone()?;
            let tenant = ns.metadata.labels.as_ref()?.get(TENANT)?.trim();
            (!tenant.is_empty()).then(|| (name, tenant.to_string()))
        })
        .collect()
}

/// The service's IPv4 cluster IP: `clusterIPs` lists every family's,
/// `clusterIP` is the primary one.
fn cluster_ipv4(primary: Option<&str>, all: Option<&[String]>) -> Option<Ipv4Addr> {
    primary
        .into_iter()
        .chain(all.unwrap_or_default().iter().map(String::as_str))
        .find_map(|ip| ip.parse().ok())
}

fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// How the proxy handles a port: its `appProtocol` first, then its name's
/// prefix (`http-web`, `grpc`, `tcp-db`), as Istio reads them; otherwise
/// detected per connection.
fn protocol_of(port: &ServicePort) -> (Protocol, UpstreamProtocol) {
    let by_name = || {
        let name = port.name.as_deref().unwrap_or_default();
        name.split('-')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let hint = port
        .app_protocol
        .as_deref()
        .map(str::to_ascii_lowercase)
        .unwrap_or_else(by_name);
    match hint.as_str() {
        "http" | "http1" | "kubernetes.io/ws" => (Protocol::Http, UpstreamProtocol::Auto),
        "http2" | "h2c" | "grpc" | "grpc-web" | "kubernetes.io/h2c" => {
            (Protocol::Http, UpstreamProtocol::Http2)
        }
        // TLS and other protocols pass through untouched.
        "tcp" | "tls" | "https" | "kubernetes.io/wss" | "mongo" | "mysql" | "redis" => {
            (Protocol::Tcp, UpstreamProtocol::Auto)
        }
        _ => (Protocol::Auto, UpstreamProtocol::Auto),
    }
}

/// The ready endpoints of one service port, each address once (an
/// endpoint can be in two slices while the controller moves it).
///
/// Ready is what new requests may go to: a terminating endpoint is not
/// ready (Kubernetes clears it first), so it leaves the proxy's table and
/// gets no new requests, while requests already sent to it finish on
/// their connections. A missing `ready` means ready, as the API says.
fn endpoints_for(
    port_name: &str,
    slices: &[&Slice],
    skipped: &mut Vec<Skipped>,
) -> Vec<config::Endpoint> {
    let ready = endpoints_in(port_name, slices, skipped, |c| c.ready.unwrap_or(true));
    if !ready.is_empty() {
        return ready;
    }
    // None ready: the terminating ones that still serve take the requests,
    // as kube-proxy does (a single replica's rollout, a Recreate
    // deployment), rather than every request failing.
    endpoints_in(port_name, slices, &mut Vec::new(), |c| {
        c.serving.unwrap_or(false) && c.terminating.unwrap_or(false)
    })
}

/// The endpoints of one service port whose conditions pass `wanted` (no
/// conditions at all: ready, serving, not terminating).
fn endpoints_in(
    port_name: &str,
    slices: &[&Slice],
    skipped: &mut Vec<Skipped>,
    wanted: impl Fn(&EndpointConditions) -> bool,
) -> Vec<config::Endpoint> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for slice in slices {
        let object = format!("EndpointSlice {}/{}", slice.namespace, slice.name);
        if slice.address_type != "IPv4" {
            skipped.push(Skipped {
                object,
                field: "addressType".into(),
                why: format!("{}: only IPv4 endpoints are served", slice.address_type),
                invalid: false,
            });
            continue;
        }
        let Some((j, (_, port))) = slice
            .ports
            .iter()
            .enumerate()
            .find(|(_, (name, _))| name == port_name)
        else {
            continue;
        };
        let Some(number) = port.and_then(port_number) else {
            skipped.push(Skipped {
                object,
                field: format!("ports[{j}].port"),
                why: format!("{port:?} is not a port number (1-65535)"),
                invalid: true,
            });
            continue;
        };
        for (k, endpoint) in slice.endpoints.iter().enumerate() {
            let default = EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            };
            if !wanted(endpoint.conditions.as_ref().unwrap_or(&default)) {
                continue;
            }
            let ip = match &endpoint.address {
                Address::V4(ip) => *ip,
                Address::Missing => continue,
                Address::Invalid(first) => {
                    skipped.push(Skipped {
                        object: object.clone(),
                        field: format!("endpoints[{k}].addresses[0]"),
                        why: format!("{first:?} is not an IPv4 address"),
                        invalid: true,
                    });
                    continue;
                }
            };
            let address = SocketAddrV4::new(ip, number);
            if seen.insert(address) {
                out.push(config::Endpoint {
                    address,
                    weight: 1,
                    region: String::new(),
                    zone: endpoint.zone.clone().unwrap_or_default(),
                });
            }
        }
    }
    out.sort_by_key(|e| e.address);
    // Held for as long as the service is: no spare capacity.
    out.shrink_to_fit();
    out
}

/// The namespaces labelled [`ENROLLED`]` = "true"`.
pub fn enrolled_namespaces<'a>(
    namespaces: impl IntoIterator<Item = &'a Namespace>,
) -> BTreeSet<String> {
    namespaces
        .into_iter()
        .filter(|ns| {
            ns.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ENROLLED))
                .is_some_and(|v| v == "true")
        })
        .filter_map(|ns| ns.metadata.name.clone())
        .collect()
}

/// The UIDs of `node`'s pods, enrolled or not.
pub fn known_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>, node: &str) -> BTreeSet<String> {
    pods.into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter_map(|p| p.metadata.uid.clone())
        .collect()
}

/// The pods of `node` enrolled in the mesh: by their namespace's
/// [`ENROLLED`] label unless the pod's own annotation says otherwise.
/// Host-network pods share the node's sockets and are never enrolled;
/// finished pods have no sockets left.
pub fn pods<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    namespaces: impl IntoIterator<Item = &'a Namespace>,
    tenants: &BTreeMap<String, String>,
    node: &str,
    skipped: &mut Vec<Skipped>,
) -> Vec<config::Pod> {
    let enrolled_namespaces: HashMap<&str, bool> = namespaces
        .into_iter()
        .filter_map(|ns| {
            let name = ns.metadata.name.as_deref()?;
            let label = ns.metadata.labels.as_ref().and_then(|l| l.get(ENROLLED));
            Some((name, label.is_some_and(|v| v == "true")))
        })
        .collect();
    let mut out = BTreeMap::new();
    for pod in pods {
        let meta = &pod.metadata;
        let (Some(namespace), Some(name), Some(uid)) = (
            meta.namespace.as_deref(),
            meta.name.as_deref(),
            meta.uid.as_deref(),
        ) else {
            continue;
        };
        let spec = pod.spec.as_ref();
        if spec.and_then(|s| s.node_name.as_deref()) != Some(node) {
            continue;
        }
        let own = meta.annotations.as_ref().and_then(|a| a.get(ENROLLED));
        let enrolled = match own.map(String::as_str) {
            Some("true") => true,
            Some("false") => false,
            other => {
                if let Some(bad) = other {
                    skipped.push(Skipped {
                        object: format!("Pod {namespace}/{name}"),
                        field: format!("metadata.annotations[{ENROLLED}]"),
                        why: format!(
                            "{bad:?}: expected \"true\" or \"false\"; the namespace decides"
                        ),
                        invalid: true,
                    });
                }
                enrolled_namespaces.get(namespace).copied().unwrap_or(false)
            }
        };
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let status = pod.status.as_ref();
        let finished = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if !enrolled || host_network || finished {
            continue;
        }
        // The IPv4 one of a dual-stack pod, whichever family is primary.
        let ip = status.and_then(|s| {
            s.pod_ip
                .iter()
                .chain(s.pod_ips.iter().flatten().map(|p| &p.ip))
                .find_map(|ip| ip.parse().ok())
        });
        out.insert(
            uid.to_string(),
            config::Pod {
                uid: uid.to_string(),
                name: Some(format!("{namespace}/{name}")),
                ip,
                tenant: tenants.get(namespace).cloned(),
            },
        );
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests;
