//! The Kubernetes source's metrics (`dataplane_kubernetes_*`).

use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Cheap to clone: every handle shares its value.
#[derive(Debug, Clone, Default)]
pub struct KubernetesMetrics {
    /// 1 while every watch has listed and streams, 0 otherwise.
    pub up: Gauge,
    /// Seconds since the API server was last reachable (0 while it is).
    stale_seconds: Gauge,
    /// 1 while routing from the disk snapshot (nothing listed yet).
    pub from_snapshot: Gauge,
    pub services: Gauge,
    pub endpoints: Gauge,
    pub pods: Gauge,
    /// Objects or parts of objects skipped as invalid.
    pub skipped: Counter,
    /// Full listings: one per watched kind at start and after each failure.
    pub listings: Counter,
    /// Watch or list failures.
    pub failures: Counter,
}

impl KubernetesMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("dataplane_kubernetes");
        r.register(
            "up",
            "1 while every watch of the Kubernetes API has listed and streams",
            self.up.clone(),
        );
        r.register(
            "stale_seconds",
            "Seconds since the Kubernetes API was last reachable (0 while it is)",
            self.stale_seconds.clone(),
        );
        r.register(
            "from_snapshot",
            "1 while routing from the disk snapshot (the API not listed yet)",
            self.from_snapshot.clone(),
        );
        r.register(
            "services",
            "Service ports read from the Kubernetes API",
            self.services.clone(),
        );
        r.register(
            "endpoints",
            "Ready endpoints read from the Kubernetes API",
            self.endpoints.clone(),
        );
        r.register(
            "pods",
            "Pods of this node enrolled by the Kubernetes API",
            self.pods.clone(),
        );
        r.register(
            "skipped_objects",
            "Kubernetes objects, or parts of them, skipped as invalid",
            self.skipped.clone(),
        );
        r.register(
            "listings",
            "Full listings of a watched kind (at start and after each failure)",
            self.listings.clone(),
        );
        r.register(
            "failures",
            "Failed lists and watches of the Kubernetes API",
            self.failures.clone(),
        );
    }

    /// `since`: when the current outage began, or `None`.
    pub fn set_stale(&self, since: Option<Instant>) {
        let seconds = since.map_or(0, |s| s.elapsed().as_secs());
        self.stale_seconds
            .set(i64::try_from(seconds).unwrap_or(i64::MAX));
    }
}
