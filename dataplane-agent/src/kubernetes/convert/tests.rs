use std::net::{Ipv4Addr, SocketAddrV4};

use serde::Deserialize as _;

use super::*;

/// The recorded objects of a fixture file (multi-document YAML of the
/// real API), by kind.
#[derive(Default)]
struct Objects {
    services: Vec<Service>,
    slices: Vec<Slice>,
    pods: Vec<Pod>,
    namespaces: Vec<Namespace>,
}

fn load(yaml: &str) -> Objects {
    let mut objects = Objects::default();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = serde_yaml_ng::Value::deserialize(doc).unwrap();
        match value["kind"].as_str().unwrap() {
            "Service" => objects
                .services
                .push(serde_yaml_ng::from_value(value).unwrap()),
            "EndpointSlice" => objects.slices.push(Slice::from(
                serde_yaml_ng::from_value::<EndpointSlice>(value).unwrap(),
            )),
            "Pod" => objects.pods.push(serde_yaml_ng::from_value(value).unwrap()),
            "Namespace" => objects
                .namespaces
                .push(serde_yaml_ng::from_value(value).unwrap()),
            other => panic!("unexpected kind {other}"),
        }
    }
    objects
}

/// The services made of `services` and the EndpointSlices that belong to
/// them (a whole cluster at once, as the source converts it a Service at a
/// time), and what was left out.
fn services<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a Slice>,
    tenants: &BTreeMap<String, String>,
    skipped: &mut Vec<Skipped>,
) -> Vec<config::Service> {
    let mut by_service: HashMap<String, Vec<&Slice>> = HashMap::new();
    for slice in slices {
        if let Some(owner) = slice.owner_key() {
            by_service.entry(owner).or_default().push(slice);
        }
    }
    let mut out = Vec::new();
    for service in services {
        let (Some(namespace), Some(name)) = (
            service.metadata.namespace.as_deref(),
            service.metadata.name.as_deref(),
        ) else {
            continue;
        };
        let slices = by_service
            .get(&format!("{namespace}/{name}"))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let tenant = tenants
            .get(namespace)
            .map(String::as_str)
            .unwrap_or_default();
        out.extend(super::service(service, slices, tenant, None, skipped));
    }
    out
}

const CLUSTER: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/kubernetes/cluster.yaml"
));
const BAD: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/kubernetes/bad.yaml"
));

fn addr(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a), port)
}

fn convert(o: &Objects) -> (Vec<config::Service>, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let tenants = namespace_tenants(&o.namespaces);
    let services = services(&o.services, &o.slices, &tenants, &mut skipped);
    (services, skipped)
}

#[test]
fn a_service_port_becomes_a_mesh_service_with_its_ready_endpoints() {
    let (services, _) = convert(&load(CLUSTER));
    let cart = services.iter().find(|s| s.name == "cart").unwrap();
    assert_eq!(cart.namespace, "shop");
    assert_eq!(cart.vip, addr([10, 96, 0, 10], 80));
    assert_eq!(cart.protocol, Protocol::Http, "port name http");
    let endpoints: Vec<_> = cart.endpoints.iter().map(|e| e.address).collect();
    // Ready ones and the one with no conditions (nil means ready); not the
    // terminating one nor the unready one.
    assert_eq!(
        endpoints,
        [
            addr([10, 244, 1, 11], 8080),
            addr([10, 244, 1, 15], 8080),
            addr([10, 244, 2, 12], 8080)
        ]
    );
    assert_eq!(cart.endpoints[0].zone, "zone-a");
    assert_eq!(cart.traffic_policy, TrafficPolicy::default());
}

#[test]
fn each_tcp_port_of_a_multi_port_service_is_its_own_vip_and_udp_is_left_out() {
    let (services, skipped) = convert(&load(CLUSTER));
    let payments: Vec<_> = services
        .iter()
        .filter(|s| s.name.starts_with("payments"))
        .collect();
    assert_eq!(payments.len(), 2);
    let grpc = payments.iter().find(|s| s.name == "payments:grpc").unwrap();
    assert_eq!(
        grpc.vip,
        addr([10, 96, 0, 11], 9090),
        "the IPv4 cluster IP of a dual-stack service"
    );
    assert_eq!(
        (grpc.protocol, grpc.upstream_protocol),
        (Protocol::Http, UpstreamProtocol::Http2)
    );
    assert_eq!(grpc.endpoints.len(), 1, "the IPv6 slice is not served");
    let metrics = payments
        .iter()
        .find(|s| s.name == "payments:metrics")
        .unwrap();
    assert_eq!(
        metrics.protocol,
        Protocol::Auto,
        "no hint: detected per connection"
    );
    assert_eq!(metrics.endpoints[0].address, addr([10, 244, 1, 21], 9100));
    assert!(skipped.iter().any(|s| s.object == "Service shop/payments"
        && s.field == "spec.ports[2].protocol"
        && !s.invalid));
    assert!(
        skipped
            .iter()
            .any(|s| s.object == "EndpointSlice shop/payments-v6-8r2lm"
                && s.field == "addressType"
                && !s.invalid)
    );
    assert!(skipped.iter().all(|s| !s.invalid), "{skipped:?}");
}

#[test]
fn headless_services_have_no_vip_and_are_not_an_error() {
    let (services, skipped) = convert(&load(CLUSTER));
    assert!(services.iter().all(|s| s.name != "db"));
    assert!(skipped.iter().all(|s| !s.object.contains("shop/db")));
}

#[test]
fn bad_objects_are_skipped_by_name_and_field_and_their_good_parts_kept() {
    let (services, skipped) = convert(&load(BAD));
    let names: Vec<_> = services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["broken-port:admin"],
        "the valid port of the service stays"
    );
    assert_eq!(
        services[0]
            .endpoints
            .iter()
            .map(|e| e.address)
            .collect::<Vec<_>>(),
        [addr([10, 244, 1, 41], 8081)],
        "the slice's good endpoint stays"
    );
    let invalid: Vec<String> = skipped
        .iter()
        .filter(|s| s.invalid)
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        invalid,
        [
            "Service shop/broken-port: spec.ports[0].port: 70000 is not a port number (1-65535)",
            "EndpointSlice shop/broken-port-abc12: endpoints[1].addresses[0]: \"not-an-ip\" is not an IPv4 address",
        ]
    );
    let unsupported: Vec<_> = skipped
        .iter()
        .filter(|s| !s.invalid)
        .map(|s| (s.object.as_str(), s.field.as_str()))
        .collect();
    assert!(unsupported.contains(&("Service shop/v6-only", "spec.clusterIPs")));
    assert!(unsupported.contains(&("EndpointSlice shop/broken-port-fqdn", "addressType")));
}

#[test]
fn pods_are_enrolled_by_namespace_label_or_their_own_annotation() {
    let o = load(CLUSTER);
    let mut skipped = Vec::new();
    let pods = pods(
        &o.pods,
        &o.namespaces,
        &BTreeMap::new(),
        "node-a",
        &mut skipped,
    );
    let names: Vec<_> = pods.iter().filter_map(|p| p.name.as_deref()).collect();
    // frontend: enrolled namespace; reporter: opted in by annotation
    // (pending, no IP yet). Not: batch-job (opted out), legacy-web
    // (namespace not enrolled), node-exporter (host network), migrate
    // (finished).
    assert_eq!(names, ["shop/frontend-7d9c8b-abcde", "legacy/reporter-0"]);
    let frontend = &pods[0];
    assert_eq!(frontend.uid, "3d1b5e7f-4051-4c93-9dae-6f7081920001");
    assert_eq!(frontend.ip, Some(Ipv4Addr::new(10, 244, 1, 31)));
    assert_eq!(pods[1].ip, None);
    assert!(skipped.is_empty());
}

#[test]
fn pods_of_other_nodes_are_not_enrolled() {
    let o = load(CLUSTER);
    assert!(
        pods(
            &o.pods,
            &o.namespaces,
            &BTreeMap::new(),
            "node-b",
            &mut Vec::new()
        )
        .is_empty()
    );
}

#[test]
fn a_bad_enrollment_annotation_is_reported_and_the_namespace_decides() {
    let cluster = load(CLUSTER);
    let bad = load(BAD);
    let mut skipped = Vec::new();
    let pods = pods(
        &bad.pods,
        &cluster.namespaces,
        &BTreeMap::new(),
        "node-a",
        &mut skipped,
    );
    assert_eq!(pods.len(), 1, "shop is enrolled");
    assert_eq!(
        skipped[0].to_string(),
        "Pod shop/typo-0: metadata.annotations[mesh.sidecarless.dev/enrolled]: \"yes\": expected \"true\" or \"false\"; the namespace decides"
    );
}

#[test]
fn protocol_hints_follow_app_protocol_then_the_port_name() {
    let port = |name: &str, app: Option<&str>| ServicePort {
        name: Some(name.to_string()),
        app_protocol: app.map(str::to_string),
        port: 80,
        ..Default::default()
    };
    assert_eq!(protocol_of(&port("web", Some("http"))).0, Protocol::Http);
    assert_eq!(protocol_of(&port("http-web", None)).0, Protocol::Http);
    assert_eq!(
        protocol_of(&port("grpc-api", None)),
        (Protocol::Http, UpstreamProtocol::Http2)
    );
    assert_eq!(
        protocol_of(&port("http", Some("https"))).0,
        Protocol::Tcp,
        "appProtocol wins"
    );
    assert_eq!(protocol_of(&port("tcp-db", None)).0, Protocol::Tcp);
    assert_eq!(protocol_of(&port("web", None)).0, Protocol::Auto);
}

#[test]
fn a_namespaces_tenant_label_gives_its_services_and_pods_a_tenant() {
    let o = load(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {mesh.sidecarless.dev/tenant: acme, mesh.sidecarless.dev/enrolled: \"true\"}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: open}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: cart\n  namespace: shop\n  annotations: {mesh.sidecarless.dev/export-to: \"globex, initech\"}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: docs\n  namespace: open\n  annotations: {mesh.sidecarless.dev/export-to: acme}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop, uid: u1}\nspec: {nodeName: node-a, containers: []}\n",
    );
    let tenants = namespace_tenants(&o.namespaces);
    assert_eq!(tenants.get("shop").map(String::as_str), Some("acme"));
    assert!(!tenants.contains_key("open"));
    let mut skipped = Vec::new();
    let services = services(&o.services, &o.slices, &tenants, &mut skipped);
    assert_eq!(services[0].tenant, "acme");
    assert_eq!(services[0].export_to, ["globex", "initech"]);
    assert_eq!(
        (services[1].tenant.as_str(), services[1].export_to.len()),
        ("", 0)
    );
    assert!(
        skipped
            .iter()
            .any(|s| s.object == "Service open/docs" && !s.invalid),
        "an export of a service without a tenant is reported: {skipped:?}"
    );
    let pods = pods(&o.pods, &o.namespaces, &tenants, "node-a", &mut skipped);
    assert_eq!(pods[0].tenant.as_deref(), Some("acme"));
}

#[test]
fn with_no_ready_endpoint_the_serving_terminating_ones_take_the_requests() {
    let o = load(
        "apiVersion: v1\nkind: Service\nmetadata: {name: one, namespace: shop}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: one-x\n  namespace: shop\n  labels: {kubernetes.io/service-name: one}\n\
         addressType: IPv4\nendpoints:\n\
         - addresses: [10.244.1.1]\n  conditions: {ready: false, serving: true, terminating: true}\n\
         - addresses: [10.244.1.2]\n  conditions: {ready: false, serving: false, terminating: true}\n\
         ports: [{port: 8080}]\n",
    );
    let (services, _) = convert(&o);
    assert_eq!(
        services[0]
            .endpoints
            .iter()
            .map(|e| e.address)
            .collect::<Vec<_>>(),
        [addr([10, 244, 1, 1], 8080)],
        "the one still serving"
    );
}

#[test]
fn a_dual_stack_pod_is_known_by_its_ipv4_address_whichever_comes_first() {
    let o = load(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {mesh.sidecarless.dev/enrolled: \"true\"}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop, uid: u1}\nspec: {nodeName: node-a, containers: []}\n\
         status: {podIP: \"fd00::5\", podIPs: [{ip: \"fd00::5\"}, {ip: 10.244.1.5}]}\n",
    );
    let pods = pods(
        &o.pods,
        &o.namespaces,
        &BTreeMap::new(),
        "node-a",
        &mut Vec::new(),
    );
    assert_eq!(pods[0].ip, Some(Ipv4Addr::new(10, 244, 1, 5)));
}
