//! Per-endpoint state machine: Healthy -> Ejected -> HalfOpen -> Healthy
//! (or back to Ejected on a failed probe). It knows nothing about the other
//! endpoints; `maxEjectionPercent` and the sweep live in the detector.

use std::time::Instant;

use super::config::OutlierDetectionConfig;
use super::counters::{Counters, probe_failed};
use super::types::{Admission, HostState, Outcome, Reason};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `since`: when it last became healthy (creation or restoration); the
    /// backoff only decays after a full interval of health (Envoy).
    Healthy {
        since: Instant,
    },
    Ejected {
        until: Instant,
    },
    /// `last_activity`: last probe grant or outcome, for the probe timeout.
    HalfOpen {
        in_flight: u32,
        successes: u32,
        last_activity: Instant,
    },
}

/// A transition driven by the clock alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timed {
    Unchanged,
    HalfOpened,
    /// Ejection ended and `successesToClose` is 0: straight back (Envoy).
    Restored,
    /// Probe slots whose outcome never came were given back.
    ProbesReclaimed(u32),
}

/// What one recorded outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    Nothing,
    /// A consecutive-error detector hit its threshold; the detector decides
    /// whether the ejection is allowed. The tripped counters are reset.
    Tripped(Reason),
    ProbeRestored,
    ProbeFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Host {
    phase: Phase,
    /// Backoff multiplier: ejection time = base * times, capped at max.
    times: u32,
    /// Counted only while healthy; reset at each ejection.
    counters: Counters,
}

impl Host {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            phase: Phase::Healthy { since: now },
            times: 0,
            counters: Counters::default(),
        }
    }

    pub(crate) fn state(&self) -> HostState {
        match self.phase {
            Phase::Healthy { .. } => HostState::Healthy,
            Phase::Ejected { until } => HostState::Ejected {
                until,
                times: self.times,
            },
            Phase::HalfOpen {
                in_flight,
                successes,
                ..
            } => HostState::HalfOpen {
                probes_in_flight: in_flight,
                successes,
            },
        }
    }

    pub(crate) fn is_healthy(&self) -> bool {
        matches!(self.phase, Phase::Healthy { .. })
    }

    /// Interval counters `(requests, failures)` for the sweep.
    pub(crate) fn interval_counts(&self) -> (u64, u64) {
        self.counters.interval()
    }

    pub(crate) fn clear_interval(&mut self) {
        self.counters.clear_interval();
    }

    /// Applies transitions that are due at `now`. Pure function of the
    /// state, so `available` can run it on a copy and agree with `admit`.
    pub(crate) fn refresh(&mut self, now: Instant, cfg: &OutlierDetectionConfig) -> Timed {
        match self.phase {
            Phase::Ejected { until } if now >= until => {
                if cfg.half_open.successes_to_close == 0 {
                    self.restore(now);
                    return Timed::Restored;
                }
                let last_activity = now;
                self.phase = Phase::HalfOpen {
                    in_flight: 0,
                    successes: 0,
                    last_activity,
                };
                Timed::HalfOpened
            }
            Phase::HalfOpen {
                in_flight,
                successes,
                last_activity,
            } if in_flight > 0
                && now.saturating_duration_since(last_activity) >= cfg.half_open.probe_timeout =>
            {
                self.phase = Phase::HalfOpen {
                    in_flight: 0,
                    successes,
                    last_activity: now,
                };
                Timed::ProbesReclaimed(in_flight)
            }
            _ => Timed::Unchanged,
        }
    }

    /// Grants a request; in half-open this takes a probe slot.
    pub(crate) fn admit(&mut self, now: Instant, cfg: &OutlierDetectionConfig) -> Admission {
        match &mut self.phase {
            Phase::Healthy { .. } => Admission::Yes,
            Phase::Ejected { .. } => Admission::No,
            Phase::HalfOpen {
                in_flight,
                last_activity,
                ..
            } => {
                if *in_flight >= cfg.half_open.probe_requests {
                    return Admission::No;
                }
                *in_flight = in_flight.saturating_add(1);
                *last_activity = now;
                Admission::Probe
            }
        }
    }

    pub(crate) fn record(
        &mut self,
        outcome: Outcome,
        now: Instant,
        cfg: &OutlierDetectionConfig,
    ) -> Recorded {
        match self.phase {
            Phase::Healthy { .. } => self
                .counters
                .observe(outcome, cfg)
                .map_or(Recorded::Nothing, Recorded::Tripped),
            // Late outcomes of requests admitted before the ejection: the
            // host is already out, and Envoy ignores them for ejection too.
            Phase::Ejected { .. } => Recorded::Nothing,
            Phase::HalfOpen {
                in_flight,
                successes,
                ..
            } => {
                if probe_failed(outcome, cfg) {
                    return Recorded::ProbeFailed;
                }
                let successes = successes.saturating_add(1);
                if successes >= cfg.half_open.successes_to_close {
                    self.restore(now);
                    return Recorded::ProbeRestored;
                }
                let in_flight = in_flight.saturating_sub(1);
                self.phase = Phase::HalfOpen {
                    in_flight,
                    successes,
                    last_activity: now,
                };
                Recorded::Nothing
            }
        }
    }

    /// Gives back a probe slot whose request ended without an outcome that
    /// says anything about the host (the client cancelled it).
    pub(crate) fn release_probe(&mut self) {
        if let Phase::HalfOpen { in_flight, .. } = &mut self.phase {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Ejects; returns `(until, times)`. Envoy's backoff: the multiplier
    /// grows while `base * times < max + base`, so it stops one step past the
    /// cap and decay soon shortens the next ejection again.
    pub(crate) fn eject(&mut self, now: Instant, cfg: &OutlierDetectionConfig) -> (Instant, u32) {
        let base = cfg.base_ejection_time;
        let max = cfg.max_ejection_time;
        if base.saturating_mul(self.times) < max.saturating_add(base) {
            self.times = self.times.saturating_add(1);
        }
        let duration = base.saturating_mul(self.times).min(max);
        // Unreachable with validated durations (<= 365d); never panic.
        let until = now.checked_add(duration).unwrap_or(now);
        self.phase = Phase::Ejected { until };
        // Envoy resets them at un-ejection; outcomes are ignored meanwhile.
        self.counters = Counters::default();
        (until, self.times)
    }

    fn restore(&mut self, now: Instant) {
        self.phase = Phase::Healthy { since: now };
    }

    /// Envoy: a host that stayed healthy for a whole interval loses one unit
    /// of backoff.
    pub(crate) fn decay(&mut self, now: Instant, cfg: &OutlierDetectionConfig) {
        if let Phase::Healthy { since } = self.phase
            && now.saturating_duration_since(since) >= cfg.interval
        {
            self.times = self.times.saturating_sub(1);
        }
    }
}
