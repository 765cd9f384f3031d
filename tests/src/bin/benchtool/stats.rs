//! Tallying request/response runs into the one JSON line the benchmark
//! harness parses.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency a histogram holds (one hour, in microseconds); larger
/// values saturate. Runs are bounded well below it.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Three significant digits: 0.1% error at any magnitude.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Results of the measured requests (warm-up excluded).
pub struct Stats {
    /// From each request's scheduled send time to its response: what a
    /// caller arriving on schedule would see (coordinated-omission-free).
    latency: Histogram<u64>,
    /// From the actual send to the response: the pure round trip, without
    /// queueing behind earlier requests or the alarm's wake-up delay.
    service: Histogram<u64>,
    /// How late the client sent requests that found their connection
    /// idle: its own timer wake-up delay, or that it could not keep up.
    lag: Histogram<u64>,
    completed: u64,
    errors: BTreeMap<&'static str, u64>,
    /// When the last measured request finished (ns, `mono_ns` clock).
    pub last_done_ns: u64,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            latency: histogram(),
            service: histogram(),
            lag: histogram(),
            completed: 0,
            errors: BTreeMap::new(),
            last_done_ns: 0,
        }
    }

    /// A successful request, done at `done`.
    pub fn completed(&mut self, timing: Timing, done: u64) {
        self.completed += 1;
        self.latency
            .saturating_record(micros(done.saturating_sub(timing.from)));
        self.service
            .saturating_record(micros(done.saturating_sub(timing.sent)));
        if let Some(lag) = timing.lag {
            self.lag.saturating_record(micros(lag));
        }
        self.last_done_ns = self.last_done_ns.max(done);
    }

    /// `count` requests that failed with `kind`.
    pub fn failed(&mut self, kind: &'static str, count: u64) {
        if count > 0 {
            *self.errors.entry(kind).or_default() += count;
        }
    }

    #[cfg(test)]
    pub fn completed_count(&self) -> u64 {
        self.completed
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The latency histogram (from the schedule), for tests.
    #[cfg(test)]
    pub fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }

    pub fn report(&self, run: RunInfo) -> RrReport {
        let elapsed = run.elapsed_s.max(f64::MIN_POSITIVE);
        RrReport {
            mode: run.mode,
            requested_rate: run.requested_rate,
            achieved_rate: round(self.completed as f64 / elapsed, 1),
            completed: self.completed,
            errors: self.error_count(),
            error_kinds: self.errors.clone(),
            duration_s: round(run.elapsed_s, 3),
            warmup_s: run.warmup_s,
            connections: run.connections,
            cpu_s: round(cpu_seconds(), 3),
            latency_us: Percentiles::of(&self.latency),
            service_us: Percentiles::of(&self.service),
            lag_us: Percentiles::of(&self.lag),
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Nanoseconds to microseconds, rounded to nearest.
fn micros(ns: u64) -> u64 {
    ns.saturating_add(500) / 1000
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// When a request's latency starts, in ns on `mono_ns`'s clock.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Where its latency counts from.
    from: u64,
    /// When it was actually sent.
    sent: u64,
    /// How late the client was in sending it, when that was the client's
    /// own doing.
    lag: Option<u64>,
}

impl Timing {
    /// An open-loop request due at `due` and sent at `sent` on a
    /// connection whose previous request finished at `prev_done`.
    ///
    /// If that connection was still busy at `due`, the request waited for
    /// the system under test: its latency counts from `due`, so the wait
    /// is included (no coordinated omission). Otherwise the connection was
    /// idle and any delay was the client's own (the kernel wakes a timer
    /// some 40 us late on these VMs): counting it would add a constant to
    /// every mode and blur the comparison, so the latency counts from the
    /// send and the delay is reported as `lag`.
    pub fn open(due: u64, sent: u64, prev_done: u64) -> Timing {
        match prev_done > due {
            true => Timing::queued(due, sent),
            false => Timing {
                from: sent,
                sent,
                lag: Some(sent.saturating_sub(due)),
            },
        }
    }

    /// A request that waited for earlier ones since `due`.
    pub fn queued(due: u64, sent: u64) -> Timing {
        Timing {
            from: due,
            sent,
            lag: None,
        }
    }

    /// A closed-loop request: it is due when it is sent.
    pub fn closed(sent: u64) -> Timing {
        Timing {
            from: sent,
            sent,
            lag: None,
        }
    }
}

/// What the report needs besides the counts.
pub struct RunInfo {
    pub mode: &'static str,
    pub requested_rate: f64,
    pub warmup_s: f64,
    /// The measured window: from its start to its end or the last
    /// response, whichever is later (so falling behind lowers the rate).
    pub elapsed_s: f64,
    pub connections: usize,
}

/// The JSON line of `tcp-rr` and `http-rr`.
#[derive(Serialize)]
pub struct RrReport {
    mode: &'static str,
    /// 0 for the closed loop.
    requested_rate: f64,
    achieved_rate: f64,
    completed: u64,
    errors: u64,
    error_kinds: BTreeMap<&'static str, u64>,
    duration_s: f64,
    warmup_s: f64,
    connections: usize,
    /// User + system CPU time of this process, warm-up and setup included:
    /// shows whether the load generator itself was the bottleneck.
    cpu_s: f64,
    /// `null` when no request completed.
    latency_us: Option<Percentiles>,
    service_us: Option<Percentiles>,
    /// Open loop only (else `null`): see [`Stats`]' `lag`.
    lag_us: Option<Percentiles>,
}

#[derive(Serialize)]
pub struct Percentiles {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        Some(Percentiles {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: round(h.mean(), 1),
        })
    }
}

/// User + system CPU seconds of this process so far.
pub fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value; getrusage only writes
    // to the pointer it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer cannot fail.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_measured_requests() {
        let mut stats = Stats::new();
        for i in 1..=1000u64 {
            // Due at 0, queued, sent at i us, done 10 us after sending.
            stats.completed(Timing::queued(0, i * 1000), i * 1000 + 10_000);
        }
        stats.failed("reset", 2);
        stats.failed("overload", 0);
        let report = stats.report(RunInfo {
            mode: "tcp-rr",
            requested_rate: 1000.0,
            warmup_s: 0.0,
            elapsed_s: 1.0,
            connections: 1,
        });
        let json = serde_json::to_value(&report).ok();
        let get = |path: &str| json.as_ref().and_then(|j| j.pointer(path)).cloned();
        assert_eq!(get("/completed"), Some(1000.into()));
        assert_eq!(get("/errors"), Some(2.into()));
        assert_eq!(get("/error_kinds"), Some(serde_json::json!({"reset": 2})));
        assert_eq!(get("/achieved_rate"), Some(1000.0.into()));
        assert_eq!(get("/latency_us/p50"), Some(510.into()));
        assert_eq!(get("/latency_us/max"), Some(1010.into()));
        assert_eq!(get("/service_us/p99"), Some(10.into()));
    }

    #[test]
    fn latency_counts_from_the_due_time_only_when_the_connection_was_busy() {
        let mut stats = Stats::new();
        // Idle connection (previous done at 50 us), due at 100 us, the
        // client woke at 140 us: 40 us of client lag, not latency.
        stats.completed(Timing::open(100_000, 140_000, 50_000), 200_000);
        // Busy connection (previous done at 300 us), due at 250 us.
        stats.completed(Timing::open(250_000, 300_000, 300_000), 360_000);
        assert_eq!(stats.latency().min(), 60);
        assert_eq!(stats.latency().max(), 110);
        assert_eq!(stats.lag.max(), 40);
        assert_eq!(stats.lag.len(), 1);
        assert_eq!(stats.service.max(), 60);
    }

    #[test]
    fn no_completions_means_no_percentiles() {
        let report = Stats::new().report(RunInfo {
            mode: "tcp-rr",
            requested_rate: 0.0,
            warmup_s: 0.0,
            elapsed_s: 0.0,
            connections: 1,
        });
        let json = serde_json::to_value(&report).ok();
        let latency = json.as_ref().and_then(|j| j.get("latency_us")).cloned();
        assert_eq!(latency, Some(serde_json::Value::Null));
    }
}
