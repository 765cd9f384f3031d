//! The registry source's metrics (`dataplane_registry_*`).

use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Cheap to clone: every handle shares its value.
#[derive(Debug, Clone, Default)]
pub struct RegistryMetrics {
    /// 1 while every watched prefix streams, 0 otherwise.
    pub up: Gauge,
    /// Seconds since the registry was last reachable (0 while it is).
    stale_seconds: Gauge,
    /// 1 while routing from the disk snapshot (nothing read yet).
    pub from_snapshot: Gauge,
    pub services: Gauge,
    pub instances: Gauge,
    /// Records skipped (outside the layout, unparsable, invalid).
    pub skipped: Counter,
    /// Listings of a watched prefix: one each at start and after each
    /// reconnection (a steady count means the watches hold).
    pub listings: Counter,
    /// Large removals held (bad-push protection), and held right now.
    pub held: Counter,
    pub held_now: Gauge,
}

impl RegistryMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("dataplane_registry");
        r.register("up", "1 while the registry is watched", self.up.clone());
        r.register(
            "stale_seconds",
            "Seconds since the registry was last reachable (0 while it is)",
            self.stale_seconds.clone(),
        );
        r.register(
            "from_snapshot",
            "1 while routing from the disk snapshot",
            self.from_snapshot.clone(),
        );
        r.register(
            "services",
            "Services read from the registry",
            self.services.clone(),
        );
        r.register(
            "instances",
            "Instances read from the registry",
            self.instances.clone(),
        );
        r.register(
            "skipped_records",
            "Registry records skipped (bad key or value)",
            self.skipped.clone(),
        );
        r.register(
            "listings",
            "Listings of a watched prefix (at start and after each reconnection)",
            self.listings.clone(),
        );
        r.register(
            "held_removals",
            "Large endpoint removals held before applying",
            self.held.clone(),
        );
        r.register(
            "held_removals_active",
            "Endpoint removals being held now",
            self.held_now.clone(),
        );
    }

    /// `since`: when the current outage began, or `None`.
    pub fn set_stale(&self, since: Option<Instant>) {
        let seconds = since.map_or(0, |s| s.elapsed().as_secs());
        self.stale_seconds
            .set(i64::try_from(seconds).unwrap_or(i64::MAX));
    }
}
