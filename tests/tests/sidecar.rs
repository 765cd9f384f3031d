//! End-to-end: sidecar mode, one proxy per pod with nftables REDIRECT, as
//! the benchmark's comparison point. A request crosses two proxies.

use std::process::Command;

use dataplane_tests::http_peers;
use dataplane_tests::scenario::{BackendSpec, ECHO_VIP, http_config};
use dataplane_tests::sidecar::Sidecar;
use dataplane_tests::{SimNode, require_privileges};

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn sidecars_carry_requests_through_two_proxies() {
    if !require_privileges("sidecars_carry_requests_through_two_proxies") {
        return;
    }
    let mut node = SimNode::new("sidecar").expect("node");
    let client = node.add_pod("client").expect("pod");
    let mut backends = Vec::new();
    for name in ["b1", "b2"] {
        let pod = node.add_pod(name).expect("pod");
        let proc = http_peers::serve(&node, &pod, name).expect("backend");
        backends.push((pod, proc));
    }
    let specs = [
        BackendSpec {
            name: "b1",
            zone: "",
        },
        BackendSpec {
            name: "b2",
            zone: "",
        },
    ];
    let config = http_config(&backends, &specs, "", &client);
    let mut client_sidecar =
        Sidecar::start(&node, &client, &config, &[8080]).expect("client sidecar");
    let backend_sidecars: Vec<Sidecar> = backends
        .iter()
        .map(|(pod, _)| Sidecar::start(&node, pod, &config, &[8080]).expect("backend sidecar"))
        .collect();

    let url = format!("http://{ECHO_VIP}/");
    let report = http_peers::load(
        &node,
        &client,
        &["--url", &url, "--requests", "40", "--concurrency", "2"],
    )
    .expect("load");
    assert_eq!(report.ok, 40, "{report:?}");
    assert_eq!(
        report.backends.len(),
        2,
        "balanced by the client's sidecar: {report:?}"
    );
    let outbound = client_sidecar.metrics().expect("metrics");
    assert_eq!(
        outbound.sum("dataplane_http_responses_total"),
        40.0,
        "outbound proxy served them"
    );
    for sidecar in &backend_sidecars {
        let inbound = sidecar.metrics().expect("metrics");
        assert!(
            inbound.sum("dataplane_http_responses_total{service=\"default/inbound-8080\"") > 0.0,
            "the backend's inbound proxy parsed them as HTTP: {:?}",
            inbound
        );
    }

    let status = client_sidecar.stop().expect("stop");
    assert!(status.success(), "graceful exit: {}", client_sidecar.log());
    let mut nft = Command::new("nft");
    nft.args(["list", "table", "ip", "dataplane_sidecar"]);
    let out = node
        .run_in_pod(&client, nft, std::time::Duration::from_secs(5))
        .expect("nft");
    assert!(!out.status.success(), "rules removed on exit");
}
