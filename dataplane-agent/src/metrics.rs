//! Prometheus metrics of the agent: proxy connection outcomes and the
//! capture programs' kernel counters.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use std::fmt::Write as _;

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::capture::tables::StatsReader;

/// Why the proxy closed a connection without forwarding it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RefuseReason {
    /// `SO_ORIGINAL_DST` had no answer: not a captured connection.
    UnknownDestination,
    /// The original destination is not a service in the config.
    NoService,
    /// The service has no endpoints.
    NoEndpoints,
    /// Every endpoint failed to connect.
    UpstreamUnavailable,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: RefuseReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Client to upstream.
    Upstream,
    /// Upstream to client.
    Downstream,
}

/// Label values in Prometheus' snake_case rather than Rust's CamelCase.
macro_rules! snake_case_label {
    ($ty:ty { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
                encoder.write_str(match self {
                    $(Self::$variant => $text),+
                })
            }
        }
    };
}

snake_case_label!(RefuseReason {
    UnknownDestination => "unknown_destination",
    NoService => "no_service",
    NoEndpoints => "no_endpoints",
    UpstreamUnavailable => "upstream_unavailable",
});
snake_case_label!(ReloadResult {
    Applied => "applied",
    Rejected => "rejected",
});
snake_case_label!(Direction {
    Upstream => "upstream",
    Downstream => "downstream",
});

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

/// The proxy's counters; cheap to clone (shared atomics).
#[derive(Clone, Debug, Default)]
pub struct ProxyMetrics {
    pub accepted: Counter,
    pub forwarded: Family<EndpointLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    pub connect_errors: Family<EndpointLabels, Counter>,
    pub active: Gauge,
    pub bytes: Family<DirectionLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReloadResult {
    Applied,
    Rejected,
}

impl ProxyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("dataplane_proxy");
        r.register(
            "accepted_connections",
            "Connections accepted",
            self.accepted.clone(),
        );
        r.register(
            "forwarded_connections",
            "Connections forwarded to an endpoint",
            self.forwarded.clone(),
        );
        r.register(
            "refused_connections",
            "Connections closed without forwarding, by reason",
            self.refused.clone(),
        );
        r.register(
            "upstream_connect_errors",
            "Failed connects to an endpoint (the next endpoint is tried)",
            self.connect_errors.clone(),
        );
        r.register(
            "active_connections",
            "Connections being forwarded",
            self.active.clone(),
        );
        r.register("bytes", "Bytes forwarded, by direction", self.bytes.clone());
        registry.register(
            "dataplane_config_reloads",
            "Config file changes, applied or rejected",
            self.reloads.clone(),
        );
    }

    pub fn reload(&self, applied: bool) {
        let result = if applied {
            ReloadResult::Applied
        } else {
            ReloadResult::Rejected
        };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    pub fn refuse(&self, reason: RefuseReason) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }
}

/// Exposes the eBPF programs' per-CPU counters, read at scrape time.
#[derive(Debug)]
pub struct CaptureCollector(pub Arc<StatsReader>);

impl std::fmt::Debug for StatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsReader")
    }
}

impl Collector for CaptureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.read();
        for (name, help, value) in [
            (
                "captured_connections",
                "Connects redirected to the node proxy",
                stats.captured,
            ),
            (
                "orig_dst_map_full",
                "Connects refused: DP_ORIG_DST map full",
                stats.orig_dst_full,
            ),
            (
                "conns_map_full",
                "Connections lost: DP_CONNS insert failed",
                stats.conns_full,
            ),
            (
                "orig_dst_served",
                "SO_ORIGINAL_DST answers given",
                stats.orig_dst_served,
            ),
            (
                "orig_dst_unknown",
                "SO_ORIGINAL_DST asked for unknown sockets",
                stats.orig_dst_unknown,
            ),
        ] {
            let counter = ConstCounter::new(value);
            let name = format!("dataplane_capture_{name}");
            let metric = encoder.encode_descriptor(&name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}
