//! Prometheus metrics of the agent: proxy connection outcomes and the
//! capture programs' kernel counters.

pub mod heap;

use std::net::SocketAddrV4;
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
use crate::health::Event;

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
    /// The service's rate limit (new connections per second).
    RateLimited,
    /// The service's `maxConnections` circuit breaker.
    Overflow,
    /// The calling pod's tenant may not call the service.
    TenantDenied,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    /// The caller's tenant (empty: none or unknown).
    pub tenant: String,
    /// The service it may not call.
    pub service: String,
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
    RateLimited => "rate_limited",
    Overflow => "overflow",
    TenantDenied => "tenant_denied",
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

/// What the idle timeout ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum IdleKind {
    /// An opaque TCP connection where neither side sent data.
    Tcp,
    /// An HTTP response whose endpoint stopped sending midway.
    HttpStream,
    /// An `auto` connection whose client never spoke.
    Silent,
}

snake_case_label!(IdleKind {
    Tcp => "tcp",
    HttpStream => "http_stream",
    Silent => "silent",
});

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdleLabels {
    pub kind: IdleKind,
}

/// The proxy's counters; cheap to clone (shared atomics).
#[derive(Clone, Debug, Default)]
pub struct ProxyMetrics {
    pub accepted: Counter,
    pub forwarded: Family<EndpointLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    /// Connections refused by tenant isolation, by the caller's tenant.
    pub tenant_denied: Family<TenantLabels, Counter>,
    pub connect_errors: Family<EndpointLabels, Counter>,
    pub active: Gauge,
    pub bytes: Family<DirectionLabels, Counter>,
    /// Directions of opaque connections that moved from the buffer copy to
    /// splice(2) because they carried a bulk transfer.
    pub splice_switches: Counter,
    /// Connections and HTTP response streams ended because nothing was
    /// sent for the idle timeout, by what they were.
    pub idle_timeouts: Family<IdleLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub http_responses: Family<ResponseLabels, Counter>,
    pub grpc_responses: Family<GrpcLabels, Counter>,
    pub retries: Family<ServiceLabels, Counter>,
    pub retry_giveups: Family<ReasonLabels, Counter>,
    pub overflows: Family<ReasonLabels, Counter>,
    pub fallbacks: Family<ReasonLabels, Counter>,
    pub local_replies: Family<ReasonLabels, Counter>,
    pub outlier_events: Family<OutlierLabels, Counter>,
    pub rate_limited: Family<RateLimitLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub service: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub service: String,
    pub grpc_status: u32,
}

/// A service and a reason or limit name (snake_case).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub service: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutlierLabels {
    pub service: String,
    pub endpoint: String,
    /// `ejected`, `half_open`, `restored`, `ejection_skipped`.
    pub event: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub service: String,
    /// The calling pod's UID when known.
    pub pod: String,
    /// `delayed` or `rejected`.
    pub decision: &'static str,
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
            "tenant_denied_connections",
            "Connections refused because the calling pod's tenant may not call the service",
            self.tenant_denied.clone(),
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
        r.register(
            "splice_switches",
            "Directions of opaque connections moved to splice(2) for a bulk transfer",
            self.splice_switches.clone(),
        );
        r.register(
            "idle_timeouts",
            "Opaque TCP connections, silent auto connections and HTTP response streams ended by the idle timeout",
            self.idle_timeouts.clone(),
        );
        let h = registry.sub_registry_with_prefix("dataplane_http");
        h.register(
            "responses",
            "Responses to clients, by status code",
            self.http_responses.clone(),
        );
        h.register(
            "grpc_responses",
            "gRPC calls answered by an endpoint, by grpc-status (0 is OK)",
            self.grpc_responses.clone(),
        );
        h.register("retries", "Retries sent", self.retries.clone());
        h.register(
            "retry_give_ups",
            "Failed requests not retried, by reason",
            self.retry_giveups.clone(),
        );
        h.register(
            "local_replies",
            "Responses made by the proxy itself, by reason",
            self.local_replies.clone(),
        );
        let p = registry.sub_registry_with_prefix("dataplane_policy");
        p.register(
            "circuit_breaker_overflows",
            "Requests or connections refused by a circuit breaker, by limit",
            self.overflows.clone(),
        );
        p.register(
            "fallbacks",
            "Fallback responses served, by reason",
            self.fallbacks.clone(),
        );
        p.register(
            "outlier_events",
            "Outlier detection ejections, half-opens and restorations",
            self.outlier_events.clone(),
        );
        p.register(
            "rate_limited",
            "Requests or connections delayed or rejected by a rate limit",
            self.rate_limited.clone(),
        );
        registry.register(
            "dataplane_config_reloads",
            "Config file changes, applied or rejected",
            self.reloads.clone(),
        );
    }

    pub fn reason(family: &Family<ReasonLabels, Counter>, service: &str, reason: &'static str) {
        let labels = ReasonLabels {
            service: service.to_string(),
            reason,
        };
        family.get_or_create(&labels).inc();
    }

    /// Logs and counts an outlier detection event of service `service`;
    /// `endpoint` names the endpoint the event's index points at.
    pub fn outlier_event(&self, service: &str, endpoint: Option<SocketAddrV4>, event: &Event) {
        let (name, reason) = match *event {
            Event::Ejected { reason, .. } => ("ejected", reason.as_str()),
            Event::HalfOpen { .. } => ("half_open", ""),
            Event::Restored { .. } => ("restored", ""),
            Event::EjectionSkipped { reason, .. } => ("ejection_skipped", reason.as_str()),
        };
        let endpoint = endpoint.map(|ep| ep.to_string()).unwrap_or_default();
        tracing::info!(%service, %endpoint, event = name, reason, ?event, "outlier detection");
        let labels = OutlierLabels {
            service: service.to_string(),
            endpoint,
            event: name,
            reason,
        };
        self.outlier_events.get_or_create(&labels).inc();
    }

    /// Codes outside gRPC's 0..=16 count as UNKNOWN (2), as gRPC clients
    /// treat them, so a misbehaving server cannot grow the label set.
    pub fn grpc_status(&self, service: &str, code: u32) {
        let labels = GrpcLabels {
            service: service.to_string(),
            grpc_status: if code <= 16 { code } else { 2 },
        };
        self.grpc_responses.get_or_create(&labels).inc();
    }

    pub fn rate_limited(&self, service: &str, pod: Option<&str>, decision: &'static str) {
        let labels = RateLimitLabels {
            service: service.to_string(),
            pod: pod.unwrap_or("").to_string(),
            decision,
        };
        self.rate_limited.get_or_create(&labels).inc();
    }

    /// The counter of idle timeouts of `kind` (a handle, for holders that
    /// count often).
    pub fn idle_timeouts(&self, kind: IdleKind) -> Counter {
        self.idle_timeouts
            .get_or_create(&IdleLabels { kind })
            .clone()
    }

    pub fn idle_timeout(&self, kind: IdleKind) {
        self.idle_timeouts.get_or_create(&IdleLabels { kind }).inc();
    }

    pub fn reload(&self, applied: bool) {
        let result = if applied {
            ReloadResult::Applied
        } else {
            ReloadResult::Rejected
        };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// Drops every series of an endpoint that left its service, so that
    /// endpoint churn does not grow the metrics (and the agent's memory)
    /// without bound.
    pub fn forget_endpoint(&self, service: &str, endpoint: SocketAddrV4) {
        let labels = EndpointLabels {
            service: service.to_string(),
            endpoint: endpoint.to_string(),
        };
        self.forwarded.remove(&labels);
        self.connect_errors.remove(&labels);
        let reasons = crate::health::Reason::ALL.map(crate::health::Reason::as_str);
        for event in ["ejected", "half_open", "restored", "ejection_skipped"] {
            for reason in reasons.iter().copied().chain([""]) {
                self.outlier_events.remove(&OutlierLabels {
                    service: labels.service.clone(),
                    endpoint: labels.endpoint.clone(),
                    event,
                    reason,
                });
            }
        }
    }

    /// Drops every series of a service that left the config.
    /// `pods`: the pods that may have been rate-limited calling it (their
    /// rate-limit series go too, with the series of callers not known as
    /// pods).
    pub fn forget_service<'a>(&self, service: &str, pods: impl Iterator<Item = &'a str>) {
        let id = service.to_string();
        for pod in pods.chain([""]) {
            for decision in ["delayed", "rejected"] {
                self.rate_limited.remove(&RateLimitLabels {
                    service: id.clone(),
                    pod: pod.to_string(),
                    decision,
                });
            }
        }
        self.retries.remove(&ServiceLabels {
            service: id.clone(),
        });
        for code in 100..=599 {
            self.http_responses.remove(&ResponseLabels {
                service: id.clone(),
                code,
            });
        }
        for grpc_status in 0..=16 {
            self.grpc_responses.remove(&GrpcLabels {
                service: id.clone(),
                grpc_status,
            });
        }
        for family in [
            &self.retry_giveups,
            &self.overflows,
            &self.fallbacks,
            &self.local_replies,
        ] {
            for reason in KNOWN_REASONS {
                family.remove(&ReasonLabels {
                    service: id.clone(),
                    reason,
                });
            }
        }
    }

    /// Drops the rate-limit series of a pod that left, for `services`.
    pub fn forget_pod<'a>(&self, pod: &str, services: impl Iterator<Item = &'a str>) {
        for service in services {
            for decision in ["delayed", "rejected"] {
                self.rate_limited.remove(&RateLimitLabels {
                    service: service.to_string(),
                    pod: pod.to_string(),
                    decision,
                });
            }
        }
    }

    pub fn refuse(&self, reason: RefuseReason) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }
}

/// The counters one service's requests touch every time, resolved once
/// per config version (each version of a service holds its own) instead
/// of per request: no label string is built and no family is hashed on
/// the request path. Responses by code are looked up in a short list
/// (a service sees a handful of codes).
#[derive(Debug, Default)]
pub struct ServiceCounters {
    responses: std::sync::RwLock<Vec<(u16, Counter)>>,
    retries: std::sync::OnceLock<Counter>,
}

impl ServiceCounters {
    /// Counts a response with status `code` to a client of `service`.
    pub fn response(&self, metrics: &ProxyMetrics, service: &str, code: u16) {
        let counted = |list: &Vec<(u16, Counter)>| match list.iter().find(|(c, _)| *c == code) {
            Some((_, counter)) => {
                counter.inc();
                true
            }
            None => false,
        };
        // The common case: a code seen before, counted under the read lock.
        if self.responses.read().is_ok_and(|list| counted(&list)) {
            return;
        }
        let labels = ResponseLabels {
            service: service.to_string(),
            code,
        };
        let counter = metrics.http_responses.get_or_create(&labels).clone();
        counter.inc();
        if let Ok(mut list) = self.responses.write()
            && !list.iter().any(|(c, _)| *c == code)
        {
            list.push((code, counter));
        }
    }

    /// Counts a retry sent for `service`.
    pub fn retry(&self, metrics: &ProxyMetrics, labels: &ServiceLabels) {
        self.retries
            .get_or_init(|| metrics.retries.get_or_create(labels).clone())
            .inc();
    }
}

/// Every `reason` label value the per-service reason families use: local
/// replies, retry give-ups and circuit-breaker limits.
const KNOWN_REASONS: &[&str] = &[
    "no_healthy_upstream",
    "upstream_connect_failure",
    "upstream_reset",
    "upstream_per_try_timeout",
    "request_timeout",
    "rate_limited",
    "overflow",
    "bad_request_body",
    "bad_upgrade",
    "upgrade_not_supported",
    "connect_not_supported",
    "no_service",
    "not_idempotent",
    "attempts_exhausted",
    "body_not_replayable",
    "breaker_open",
    "budget_exhausted",
    "max_connections",
    "max_pending_requests",
    "max_requests",
    "max_retries",
];

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
            (
                "proxy_down_refused",
                "Captured connects refused while no proxy listened (fail-closed)",
                stats.proxy_down_refused,
            ),
            (
                "proxy_down_direct",
                "Captured connects sent straight to an endpoint while no proxy listened (fail-open)",
                stats.proxy_down_direct,
            ),
            (
                "tenant_denied",
                "Captured connects refused because the pod's tenant may not call the service",
                stats.tenant_denied,
            ),
            (
                "fast_path_direct",
                "Sending directions of sockets whose data went socket to socket (kernel fast path)",
                stats.fast_direct,
            ),
            (
                "fast_path_tcp",
                "Sending directions of fast-path sockets that went through TCP (peer not on the fast path at their first message)",
                stats.fast_tcp,
            ),
            (
                "fast_path_bulk",
                "Sending directions of fast-path sockets that went through TCP because their first message was a bulk stream's (32 KiB or more)",
                stats.fast_bulk,
            ),
            (
                "fast_path_spliced",
                "Sending directions of relayed connections the kernel took past the proxy (pod to pod on this node)",
                stats.fast_spliced,
            ),
            (
                "fast_path_full",
                "Sockets left off the fast path because its maps were full",
                stats.fast_full,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(metrics: &ProxyMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn series_of_departed_services_endpoints_and_pods_are_dropped() {
        let m = ProxyMetrics::default();
        let ep: SocketAddrV4 = "10.0.0.1:80".parse().unwrap();
        for (service, code) in [("default/gone", 503), ("default/kept", 200)] {
            m.http_responses
                .get_or_create(&ResponseLabels {
                    service: service.into(),
                    code,
                })
                .inc();
            ProxyMetrics::reason(&m.local_replies, service, "upstream_reset");
            m.grpc_status(service, 14);
            m.rate_limited(service, Some("pod-1"), "rejected");
        }
        m.forwarded
            .get_or_create(&EndpointLabels {
                service: "default/kept".into(),
                endpoint: ep.to_string(),
            })
            .inc();
        let event = Event::Ejected {
            idx: 0,
            reason: crate::health::Reason::Consecutive5xx,
            until: std::time::Instant::now(),
            times: 1,
        };
        m.outlier_event("default/kept", Some(ep), &event);
        m.rate_limited("default/gone", None, "rejected");
        m.forget_service("default/gone", ["pod-1"].into_iter());
        m.forget_endpoint("default/kept", ep);
        // The departed service's rate-limit series went with it.
        m.forget_pod("pod-1", ["default/kept"].into_iter());
        let text = encoded(&m);
        assert!(!text.contains("default/gone"), "{text}");
        assert!(!text.contains("10.0.0.1:80"), "{text}");
        assert!(!text.contains("pod-1"), "{text}");
        assert!(text.contains("default/kept"), "{text}");
    }
}

#[cfg(test)]
mod grpc_labels {
    use super::*;

    #[test]
    fn out_of_range_grpc_codes_count_as_unknown() {
        let m = ProxyMetrics::default();
        for code in [14, 99, u32::MAX] {
            m.grpc_status("default/svc", code);
        }
        let codes: Vec<u32> = [2, 14, 99]
            .into_iter()
            .filter(|&grpc_status| {
                m.grpc_responses
                    .get(&GrpcLabels {
                        service: "default/svc".into(),
                        grpc_status,
                    })
                    .is_some()
            })
            .collect();
        assert_eq!(codes, [2, 14], "99 and 2^32-1 became UNKNOWN");
    }
}

#[cfg(test)]
mod service_counters {
    use super::*;

    #[test]
    fn resolved_counters_are_the_family_series() {
        let m = ProxyMetrics::default();
        let counters = ServiceCounters::default();
        let labels = ServiceLabels {
            service: "default/s".into(),
        };
        for code in [200, 200, 503, 200] {
            counters.response(&m, "default/s", code);
        }
        counters.retry(&m, &labels);
        counters.retry(&m, &labels);
        let series = |code| {
            m.http_responses
                .get(&ResponseLabels {
                    service: "default/s".into(),
                    code,
                })
                .map(|c| c.get())
        };
        assert_eq!((series(200), series(503)), (Some(3), Some(1)));
        assert_eq!(m.retries.get(&labels).map(|c| c.get()), Some(2));
    }
}
