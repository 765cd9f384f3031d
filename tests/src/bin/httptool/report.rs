//! Tallying `load` results into the one JSON line the harness parses.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use http::HeaderMap;
use serde::Serialize;

use crate::client::Exchanged;

/// Running totals; one per `load`, behind a mutex.
#[derive(Default)]
pub struct Tally {
    sent: u64,
    ok: u64,
    statuses: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    backends: BTreeMap<String, u64>,
    overflow: BTreeMap<String, u64>,
    fallback: u64,
    retry_after: BTreeSet<String>,
    /// Latency of every request that got a complete response.
    latencies_us: Vec<u64>,
}

impl Tally {
    pub fn sent(&mut self) {
        self.sent += 1;
    }

    pub fn record(&mut self, outcome: Result<Exchanged, &'static str>, latency: Duration) {
        match outcome {
            Ok(exchanged) => self.response(&exchanged, latency),
            Err(kind) => *self.errors.entry(kind.to_owned()).or_default() += 1,
        }
    }

    fn response(&mut self, exchanged: &Exchanged, latency: Duration) {
        let status = exchanged.head.status;
        if status.is_success() {
            self.ok += 1;
        }
        *self
            .statuses
            .entry(status.as_u16().to_string())
            .or_default() += 1;
        let headers = &exchanged.head.headers;
        if let Some(backend) = header(headers, "x-backend") {
            *self.backends.entry(backend).or_default() += 1;
        }
        if let Some(reason) = header(headers, "x-dataplane-overflow") {
            *self.overflow.entry(reason).or_default() += 1;
        }
        if headers.contains_key("x-dataplane-fallback") {
            self.fallback += 1;
        }
        if let Some(value) = header(headers, "retry-after") {
            self.retry_after.insert(value);
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latencies_us.push(micros);
    }

    pub fn finish(mut self, elapsed: Duration) -> Report {
        self.latencies_us.sort_unstable();
        let latency_us = Latency {
            p50: percentile(&self.latencies_us, 50),
            p99: percentile(&self.latencies_us, 99),
            max: self.latencies_us.last().copied().unwrap_or(0),
        };
        Report {
            sent: self.sent,
            ok: self.ok,
            statuses: self.statuses,
            errors: self.errors,
            backends: self.backends,
            overflow: self.overflow,
            fallback: self.fallback,
            retry_after: self.retry_after,
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            latency_us,
        }
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Nearest-rank percentile of sorted values; 0 when there are none.
fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// The JSON line `load` prints.
#[derive(Serialize)]
pub struct Report {
    sent: u64,
    ok: u64,
    statuses: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    backends: BTreeMap<String, u64>,
    overflow: BTreeMap<String, u64>,
    fallback: u64,
    retry_after: BTreeSet<String>,
    elapsed_ms: u64,
    latency_us: Latency,
}

#[derive(Serialize)]
struct Latency {
    p50: u64,
    p99: u64,
    max: u64,
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50), 50);
        assert_eq!(percentile(&values, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 50), 0);
    }
}
