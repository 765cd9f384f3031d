use std::time::Duration;

use super::yaml;
use crate::resilience::backoff::{Backoff, Jitter};
use crate::resilience::budget::BudgetConfig;
use crate::resilience::retry::{Failure, RetryOn, RetryPolicy};

const TRANSPORT: [Failure; 4] = [
    Failure::ConnectFailure,
    Failure::RefusedStream,
    Failure::Reset,
    Failure::Timeout,
];

fn only(retry_on: RetryOn, codes: &[u16]) -> RetryPolicy {
    RetryPolicy {
        retry_on: vec![retry_on],
        retriable_status_codes: codes.to_vec(),
        ..RetryPolicy::default()
    }
}

/// Every failure `policy` retries, out of a set covering each condition's edges.
fn retried(policy: &RetryPolicy) -> Vec<Failure> {
    let statuses = [
        200, 404, 408, 409, 429, 499, 500, 501, 502, 503, 504, 505, 599,
    ];
    let grpc = [0, 1, 2, 4, 8, 13, 14, 16];
    TRANSPORT
        .into_iter()
        .chain(statuses.map(Failure::Status))
        .chain(grpc.map(Failure::GrpcStatus))
        .filter(|f| policy.is_retriable(f))
        .collect()
}

#[test]
fn empty_mapping_gives_the_documented_defaults() {
    let p: RetryPolicy = yaml("{}").unwrap();
    assert_eq!(p, RetryPolicy::default());
    assert_eq!(p.attempts, 2);
    assert_eq!(p.per_try_timeout, None);
    assert_eq!(
        p.retry_on,
        [
            RetryOn::ConnectFailure,
            RetryOn::RefusedStream,
            RetryOn::Reset,
            RetryOn::GatewayError,
            RetryOn::Unavailable,
            RetryOn::Cancelled,
            RetryOn::RetriableStatusCodes
        ]
    );
    assert!(p.retriable_status_codes.is_empty());
    assert!(!p.retry_non_idempotent);
    assert_eq!(p.backoff, Backoff::default());
    assert_eq!(p.budget, BudgetConfig::default());
}

#[test]
fn default_policy_retries_transport_failures_gateway_errors_and_grpc_unavailable_cancelled() {
    use Failure::*;
    assert_eq!(
        retried(&RetryPolicy::default()),
        [
            ConnectFailure,
            RefusedStream,
            Reset,
            Timeout,
            Status(502),
            Status(503),
            Status(504),
            GrpcStatus(1),
            GrpcStatus(14)
        ]
    );
}

#[test]
fn parses_the_documented_example() {
    let p: RetryPolicy = yaml(
        "attempts: 3
perTryTimeout: 500ms
retryOn: [connect-failure, refused-stream, reset, gateway-error, 5xx, retriable-4xx,
          retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted,
          unavailable]
retriableStatusCodes: [409]
backoff: {baseInterval: 10ms, maxInterval: 100ms, jitter: none}
budget: {retryPercent: 25, minRetriesPerSecond: 5, window: 20s}
",
    )
    .unwrap();
    assert_eq!(p.attempts, 3);
    assert_eq!(p.per_try_timeout, Some(Duration::from_millis(500)));
    assert_eq!(p.retry_on.len(), 12);
    assert_eq!(p.retriable_status_codes, [409]);
    assert_eq!(p.backoff.jitter, Jitter::None);
    assert_eq!(p.backoff.max_interval, Duration::from_millis(100));
    assert_eq!(p.budget.retry_percent, 25.0);
    assert_eq!(p.budget.window, Duration::from_secs(20));
}

#[test]
fn attempts_zero_is_valid() {
    let p: RetryPolicy = yaml("attempts: 0").unwrap();
    assert_eq!(p.attempts, 0);
}

#[test]
fn rejects_unknown_and_unsupported_retry_on_names() {
    for bad in [
        "5XX",
        "gateway_error",
        "envoy-ratelimited",
        "reset-before-request",
        "503",
    ] {
        let err = yaml::<RetryPolicy>(&format!("retryOn: [\"{bad}\"]")).unwrap_err();
        assert!(err.contains("unknown variant"), "{bad}: {err}");
    }
}

#[test]
fn zero_per_try_timeout_is_kept_as_off() {
    let p = yaml::<RetryPolicy>("perTryTimeout: 0s").unwrap();
    assert_eq!(p.per_try_timeout, Some(Duration::ZERO));
}

#[test]
fn rejects_status_codes_outside_http_range() {
    for bad in ["99", "600"] {
        let err = yaml::<RetryPolicy>(&format!("retriableStatusCodes: [503, {bad}]")).unwrap_err();
        assert!(err.starts_with("retriableStatusCodes: "), "{err}");
    }
    assert!(yaml::<RetryPolicy>("retriableStatusCodes: [70000]").is_err());
}

#[test]
fn nested_errors_are_reported_with_their_field() {
    let err = yaml::<RetryPolicy>("backoff: {baseInterval: 1s, maxInterval: 10ms}").unwrap_err();
    assert!(
        err.contains("maxInterval: must be >= baseInterval"),
        "{err}"
    );
    let err = yaml::<RetryPolicy>("budget: {retryPercent: 150}").unwrap_err();
    assert!(err.contains("retryPercent: must be within"), "{err}");
    assert!(yaml::<RetryPolicy>("retries: 3").is_err());
}

#[test]
fn serializes_back_to_the_same_policy() {
    let mut p = RetryPolicy {
        per_try_timeout: Some(Duration::from_millis(250)),
        retriable_status_codes: vec![409, 503],
        ..RetryPolicy::default()
    };
    p.retry_on.push(RetryOn::FiveXx);
    let text = serde_yaml_ng::to_string(&p).unwrap();
    assert!(
        text.contains("- 5xx") && text.contains("perTryTimeout: 250ms"),
        "{text}"
    );
    assert_eq!(yaml::<RetryPolicy>(&text).unwrap(), p);
}

#[test]
fn five_xx_covers_all_5xx_and_every_transport_failure() {
    use Failure::*;
    let expect: Vec<_> = TRANSPORT
        .into_iter()
        .chain([500, 501, 502, 503, 504, 505, 599].map(Status))
        .collect();
    assert_eq!(retried(&only(RetryOn::FiveXx, &[])), expect);
}

#[test]
fn gateway_error_covers_502_503_504_and_every_transport_failure() {
    use Failure::*;
    let expect: Vec<_> = TRANSPORT
        .into_iter()
        .chain([502, 503, 504].map(Status))
        .collect();
    assert_eq!(retried(&only(RetryOn::GatewayError, &[])), expect);
}

#[test]
fn reset_covers_only_failures_without_a_response() {
    assert_eq!(retried(&only(RetryOn::Reset, &[])), TRANSPORT);
}

#[test]
fn narrow_conditions_match_only_their_failure() {
    use Failure::*;
    let cases = [
        (RetryOn::ConnectFailure, ConnectFailure),
        (RetryOn::RefusedStream, RefusedStream),
        (RetryOn::Retriable4xx, Status(409)),
        (RetryOn::Cancelled, GrpcStatus(1)),
        (RetryOn::DeadlineExceeded, GrpcStatus(4)),
        (RetryOn::ResourceExhausted, GrpcStatus(8)),
        (RetryOn::Internal, GrpcStatus(13)),
        (RetryOn::Unavailable, GrpcStatus(14)),
    ];
    for (condition, failure) in cases {
        assert_eq!(
            retried(&only(condition, &[409, 503])),
            [failure],
            "{condition:?}"
        );
    }
}

#[test]
fn retriable_status_codes_match_listed_codes_only_when_enabled() {
    use Failure::Status;
    let p = only(RetryOn::RetriableStatusCodes, &[429, 503]);
    assert_eq!(retried(&p), [Status(429), Status(503)]);
    // Envoy ignores the list unless `retriable-status-codes` is in retryOn.
    assert!(
        retried(&only(RetryOn::Reset, &[429, 503]))
            .iter()
            .all(|f| !matches!(f, Status(_)))
    );
}

#[test]
fn empty_retry_on_retries_nothing() {
    let p = RetryPolicy {
        retry_on: vec![],
        ..RetryPolicy::default()
    };
    assert!(retried(&p).is_empty());
}

#[test]
fn status_failure_reports_only_statuses_the_policy_retries() {
    let p = RetryPolicy {
        retry_on: vec![RetryOn::GatewayError, RetryOn::RetriableStatusCodes],
        retriable_status_codes: vec![409],
        ..RetryPolicy::default()
    };
    assert_eq!(p.status_failure(503), Some(Failure::Status(503)));
    assert_eq!(p.status_failure(409), Some(Failure::Status(409)));
    for final_status in [200, 204, 404, 500, 501] {
        assert_eq!(p.status_failure(final_status), None, "{final_status}");
    }
}

#[test]
fn grpc_failure_reports_only_codes_the_policy_retries() {
    let p = RetryPolicy::default();
    assert_eq!(p.grpc_failure(14), Some(Failure::GrpcStatus(14)));
    assert_eq!(p.grpc_failure(0), None);
    assert_eq!(p.grpc_failure(13), None);
}
