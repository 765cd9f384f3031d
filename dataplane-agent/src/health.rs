//! Outlier detection (passive health checking) for the endpoints of one
//! service: Envoy's detectors and ejection algorithm, plus a half-open state.
//!
//! # Detectors (Envoy semantics unless noted)
//! - `consecutive5xxErrors`: HTTP 5xx in a row. Reset by any non-5xx
//!   response or `Success`; a `LocalFailure` neither counts nor resets it.
//! - `consecutiveGatewayErrors`: 502/503/504 *and* local failures in a row
//!   (Istio's definition, covering TCP services). Reset by anything else,
//!   including a 500 (Envoy resets it on non-gateway 5xx).
//! - `consecutiveLocalOriginFailures`: `LocalFailure`s in a row, reset by any
//!   response or `Success` (the connection worked). This is Envoy's
//!   `split_external_local_origin_errors: true` counter, but we do *not* split
//!   the others: a local failure still counts as a gateway error and as a
//!   failure for the rate detectors, as Envoy does without the split. Deviation:
//!   Envoy with the split has separate local-origin success-rate detectors; we
//!   have one rate monitor where failure = 5xx or local failure.
//! - Success rate / failure percentage: evaluated every `interval` by `tick`
//!   over the interval's counters of *healthy* hosts (`health/stats.rs`). Envoy
//!   ejects in map order; we eject worst first.
//!
//! Thresholds trigger at `>=` and the tripped counter is reset whether or not
//! the ejection is allowed (Envoy), so a skipped host needs a fresh run.
//!
//! # Ejection
//! Allowed iff `100 * (out + 1) / endpoints <= maxEjectionPercent` (Envoy's
//! rule, counting this ejection), where `out` counts ejected *and
//! half-open* hosts (half-open hosts carry almost no traffic); or, with
//! `alwaysEjectOneHost` (on by default here, off in Envoy), when
//! `out == 0`. So with the default 10 %, any service ejects its first bad
//! endpoint, and a service of three never more than one. A skipped
//! ejection is `Event::EjectionSkipped` and `Stats::ejections_overflow`.
//! Duration: `min(base * times, max)` where `times` is incremented at each
//! ejection while `base * times < max + base` and decremented at each sweep
//! for a host healthy for at least one full interval (both Envoy). Envoy
//! un-ejects only at sweeps; we do it on any `tick`, `admit` or `record`.
//!
//! # Half-open (not in Envoy)
//! Envoy returns an ejected host straight to full traffic. Here, when the
//! ejection ends the host becomes half-open: `admit` grants at most
//! `probeRequests` concurrent probes; `successesToClose` probe successes in a
//! row restore it (counters reset, `times` kept so it still decays); a
//! probe failure (an outcome any *enabled* detector counts as a failure)
//! re-ejects at once with reason `ProbeFailed`, the next longer duration,
//! and no `maxEjectionPercent` check (the host was already counted out).
//! Every outcome recorded while half-open counts as a probe result. A probe
//! slot with no outcome for `probeTimeout` is given back. `successesToClose:
//! 0` disables half-open (Envoy behaviour).
//!
//! Unknown endpoint indices fail open: admitted, available, ignored by
//! `record`, reported `Healthy`.

pub mod config;
mod counters;
mod eject;
mod host;
mod stats;
mod types;

#[cfg(test)]
mod tests;

use std::time::Instant;

pub use config::{
    ConfigError, FailurePercentageConfig, HalfOpenConfig, OutlierDetectionConfig, SuccessRateConfig,
};
pub use types::{Admission, Event, HostState, LocalFailure, Outcome, Reason, Stats};

use host::{Host, Recorded, Timed};

/// Outlier detector for one service, indexed by endpoint position. Not
/// thread-safe by design: the integrator wraps it in a `Mutex`.
#[derive(Debug, Clone)]
pub struct OutlierDetector {
    cfg: OutlierDetectionConfig,
    hosts: Vec<Host>,
    last_sweep: Instant,
    stats: Stats,
    /// Events from clock transitions applied inside `admit`/`record`,
    /// handed out by the next `tick`.
    pending: Vec<Event>,
}

impl OutlierDetector {
    /// All `endpoints` start healthy; the first sweep is at `now + interval`.
    pub fn new(cfg: OutlierDetectionConfig, endpoints: usize, now: Instant) -> Self {
        Self {
            cfg,
            hosts: vec![Host::new(now); endpoints],
            last_sweep: now,
            stats: Stats::default(),
            pending: Vec::new(),
        }
    }

    /// Replaces the endpoint list. `keep[i]` is the old index of new endpoint
    /// `i`, or `None` if it is new (it starts healthy). Old endpoints not
    /// named are dropped; an old index named twice (or out of range) is kept
    /// only for its first occurrence, so one ejection is never duplicated.
    pub fn set_endpoints(&mut self, keep: &[Option<usize>], now: Instant) {
        let mut taken = vec![false; self.hosts.len()];
        let hosts = keep
            .iter()
            .map(
                |old| match old.and_then(|o| Some((o, self.hosts.get(o)?))) {
                    Some((o, host)) if !taken[o] => {
                        taken[o] = true;
                        *host
                    }
                    _ => Host::new(now),
                },
            )
            .collect();
        self.hosts = hosts;
    }

    /// Swaps the config, keeping all host state. Current ejections keep
    /// their end time; new thresholds apply from the next outcome.
    pub fn set_config(&mut self, cfg: OutlierDetectionConfig) {
        self.cfg = cfg;
    }

    pub fn config(&self) -> &OutlierDetectionConfig {
        &self.cfg
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Feeds one request outcome; returns the state change it caused.
    pub fn record(&mut self, idx: usize, outcome: Outcome, now: Instant) -> Option<Event> {
        self.refresh(idx, now);
        let host = self.hosts.get_mut(idx)?;
        match host.record(outcome, now, &self.cfg) {
            Recorded::Nothing => None,
            Recorded::Tripped(reason) => Some(self.try_eject(idx, reason, now)),
            Recorded::ProbeFailed => Some(self.eject(idx, Reason::ProbeFailed, now)),
            Recorded::ProbeRestored => {
                self.stats.on_restored();
                Some(Event::Restored { idx })
            }
        }
    }

    /// Applies due clock transitions and, once per `interval`, the sweep
    /// (success rate, failure percentage, backoff decay, counter reset).
    pub fn tick(&mut self, now: Instant) -> Vec<Event> {
        let mut events = std::mem::take(&mut self.pending);
        for idx in 0..self.hosts.len() {
            events.extend(self.apply_timed(idx, now));
        }
        if now.saturating_duration_since(self.last_sweep) >= self.cfg.interval {
            self.last_sweep = now;
            self.sweep(now, &mut events);
        }
        events
    }

    /// Asks to send one request to `idx`; `Probe` holds a probe slot until
    /// the outcome is recorded.
    pub fn admit(&mut self, idx: usize, now: Instant) -> Admission {
        self.refresh(idx, now);
        match self.hosts.get_mut(idx) {
            Some(host) => host.admit(now, &self.cfg),
            None => Admission::Yes,
        }
    }

    /// Frees the probe slot `admit` granted to a request that ended with
    /// no verdict on the host (cancelled by its client): neither a success
    /// nor a failure is recorded.
    pub fn release_probe(&mut self, idx: usize) {
        if let Some(host) = self.hosts.get_mut(idx) {
            host.release_probe();
        }
    }

    /// Whether `admit` would currently say `Yes` or `Probe` (half-open hosts
    /// count only while a probe slot is free). Takes no slot.
    pub fn available(&self, idx: usize, now: Instant) -> bool {
        let Some(host) = self.hosts.get(idx) else {
            return true;
        };
        let mut h = *host;
        h.refresh(now, &self.cfg);
        h.admit(now, &self.cfg) != Admission::No
    }

    /// `available` for every endpoint into `out` (extra slots: `true`).
    pub fn fill_available(&self, out: &mut [bool], now: Instant) {
        for (idx, slot) in out.iter_mut().enumerate() {
            *slot = self.available(idx, now);
        }
    }

    /// State as of the last transition applied (no clock transition).
    pub fn state(&self, idx: usize) -> HostState {
        self.hosts.get(idx).map_or(HostState::Healthy, Host::state)
    }

    /// Hosts currently ejected or half-open (Envoy's `ejections_active`).
    pub fn ejections_active(&self) -> usize {
        self.hosts.iter().filter(|h| !h.is_healthy()).count()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Clock transitions from `admit`/`record`: events wait for `tick`.
    fn refresh(&mut self, idx: usize, now: Instant) {
        if let Some(event) = self.apply_timed(idx, now) {
            self.pending.push(event);
        }
    }

    fn apply_timed(&mut self, idx: usize, now: Instant) -> Option<Event> {
        let host = self.hosts.get_mut(idx)?;
        match host.refresh(now, &self.cfg) {
            Timed::Unchanged => None,
            Timed::HalfOpened => {
                self.stats.on_half_open();
                Some(Event::HalfOpen { idx })
            }
            Timed::Restored => {
                self.stats.on_restored();
                Some(Event::Restored { idx })
            }
            Timed::ProbesReclaimed(n) => {
                self.stats.on_probes_reclaimed(n);
                None
            }
        }
    }
}
