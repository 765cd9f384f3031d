//! Tenant isolation in the proxy: the caller is known by its pod address,
//! and a pod of another tenant than the service's may call it only when
//! the service is exported to that tenant (the connect hooks refuse it
//! first on a node; this is the proxy's own check, for a connection that
//! got past them).

use std::net::Ipv4Addr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use dataplane_agent::config::MeshConfig;
use dataplane_agent::metrics::ProxyMetrics;
use dataplane_agent::proxy::Proxy;
use dataplane_agent::state::{NodeContext, ServiceTable};
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::{Backend, Mode, TestProxy, bounded, client_from, config_with, endpoint};

const TENANT_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const TENANT_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const NO_TENANT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
/// A caller the proxy has no address for (a pod whose IP has not been
/// delivered yet): the connect hook, which knew its tenant, let it in.
const UNKNOWN: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);

/// Service `echo` of tenant `b`, exported to `export_to`; pods of tenants
/// a and b and one without a tenant.
fn mesh(backend: &Backend, export_to: &str) -> String {
    let service = config_with(
        "http",
        &[endpoint(backend, "")],
        &format!("    tenant: b\n    exportTo: {export_to}\n"),
    );
    format!(
        "{service}pods:\n  - {{uid: pa, ip: {TENANT_A}, tenant: a}}\n  - {{uid: pb, ip: {TENANT_B}, tenant: b}}\n  - {{uid: pn, ip: {NO_TENANT}}}\n"
    )
}

async fn get_from(proxy: &TestProxy, source: Ipv4Addr) -> Result<StatusCode, String> {
    let req = Request::get(proxy.url()).body(Full::default()).unwrap();
    client_from(source, false)
        .request(req)
        .await
        .map(|r| r.status())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_tenants_service_is_refused_to_other_tenants_until_exported_to_them() {
    bounded(async {
        let backend = Backend::start("b1", Mode::Ok).await;
        let yaml = mesh(&backend, "[]");
        let config = MeshConfig::parse(&yaml, std::path::Path::new("t.yaml")).unwrap();
        let table = ServiceTable::build(&config, None, &NodeContext::default());
        let services = Arc::new(ArcSwap::from_pointee(table));
        let proxy = Arc::new(Proxy::new(
            Arc::clone(&services),
            ProxyMetrics::default(),
            0,
        ));
        let vip = config.services[0].vip;
        let proxy = TestProxy::serve(proxy, vip, None).await;

        assert_eq!(
            get_from(&proxy, TENANT_B).await,
            Ok(StatusCode::OK),
            "its own tenant"
        );
        assert_eq!(
            get_from(&proxy, UNKNOWN).await,
            Ok(StatusCode::OK),
            "not placed by the proxy: the kernel's check stands"
        );
        for (who, source) in [("tenant a", TENANT_A), ("no tenant", NO_TENANT)] {
            assert!(get_from(&proxy, source).await.is_err(), "{who}: refused");
        }
        assert_eq!(backend.hits(), 2, "refused callers never reach the backend");
        assert_eq!(
            proxy.metric(
                "dataplane_proxy_tenant_denied_connections_total",
                &["tenant=\"a\"", "service=\"default/echo\""]
            ),
            1.0
        );
        assert_eq!(
            proxy.metric(
                "dataplane_proxy_refused_connections_total",
                &["reason=\"tenant_denied\""]
            ),
            2.0
        );

        // Exported to a: a may call it; a caller without a tenant still not.
        let exported =
            MeshConfig::parse(&mesh(&backend, "[a]"), std::path::Path::new("t.yaml")).unwrap();
        services.store(Arc::new(ServiceTable::build(
            &exported,
            Some(&services.load()),
            &NodeContext::default(),
        )));
        assert_eq!(get_from(&proxy, TENANT_A).await, Ok(StatusCode::OK));
        assert!(get_from(&proxy, NO_TENANT).await.is_err());
        // Exported to every tenant: anyone enrolled.
        let open =
            MeshConfig::parse(&mesh(&backend, "['*']"), std::path::Path::new("t.yaml")).unwrap();
        services.store(Arc::new(ServiceTable::build(
            &open,
            Some(&services.load()),
            &NodeContext::default(),
        )));
        assert_eq!(get_from(&proxy, NO_TENANT).await, Ok(StatusCode::OK));
    })
    .await;
}

#[test]
fn export_to_is_only_for_a_tenants_service() {
    let err = MeshConfig::parse(
        "services:\n  - {name: s, vip: 198.19.0.1:80, exportTo: [a]}\n",
        std::path::Path::new("t.yaml"),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("exportTo: only a service with a tenant"),
        "{err}"
    );
}
