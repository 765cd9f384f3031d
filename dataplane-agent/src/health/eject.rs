//! Ejection decisions that involve more than one endpoint: the interval
//! sweep and the `maxEjectionPercent` guard.

use std::time::Instant;

use super::host::Host;
use super::{Event, OutlierDetector, Reason, stats};

impl OutlierDetector {
    /// The periodic part of `tick` (Envoy's `onIntervalTimer` after the
    /// un-eject pass): statistical ejections, backoff decay, counter reset.
    pub(super) fn sweep(&mut self, now: Instant, events: &mut Vec<Event>) {
        if self.cfg.success_rate.is_some() || self.cfg.failure_percentage.is_some() {
            let samples: Vec<stats::Sample> = self
                .hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| h.is_healthy())
                .map(|(idx, h)| {
                    let (requests, failures) = h.interval_counts();
                    stats::Sample {
                        idx,
                        requests,
                        failures,
                    }
                })
                .collect();
            for c in stats::outliers(&samples, &self.cfg) {
                // A host can be both a success-rate and a failure-% outlier.
                if self.hosts.get(c.idx).is_some_and(Host::is_healthy) {
                    events.push(self.try_eject(c.idx, c.reason, now));
                }
            }
        }
        for host in &mut self.hosts {
            host.decay(now, &self.cfg);
            host.clear_interval();
        }
    }

    /// Ejects a healthy host if `maxEjectionPercent` allows it, counting
    /// this ejection (Envoy's rule since 1.27), or if none is out and
    /// `alwaysEjectOneHost` (on by default) allows the first one, so a
    /// service of three can eject its bad endpoint under the default 10 %.
    pub(super) fn try_eject(&mut self, idx: usize, reason: Reason, now: Instant) -> Event {
        let out = self.ejections_active();
        let after = (out.saturating_add(1) as f64) * 100.0;
        let allowed = after <= self.cfg.max_ejection_percent * self.hosts.len() as f64
            || (self.cfg.always_eject_one_host && out == 0);
        if !allowed {
            self.stats.on_skipped(reason);
            return Event::EjectionSkipped { idx, reason };
        }
        self.eject(idx, reason, now)
    }

    pub(super) fn eject(&mut self, idx: usize, reason: Reason, now: Instant) -> Event {
        let Some(host) = self.hosts.get_mut(idx) else {
            return Event::EjectionSkipped { idx, reason };
        };
        let (until, times) = host.eject(now, &self.cfg);
        self.stats.on_ejected(reason);
        Event::Ejected {
            idx,
            reason,
            until,
            times,
        }
    }
}
