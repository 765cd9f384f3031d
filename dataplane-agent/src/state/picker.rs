//! The endpoints one request or connection tries, in order. HTTP requests
//! and opaque TCP connections both pick through this, so they skip what
//! was tried, admit half-open endpoints and fail over the same way; they
//! differ only in whether an endpoint may be tried twice.

use super::{Chosen, Service};

pub struct Picker<'a> {
    service: &'a Service,
    hash: Option<u64>,
    tried: Vec<usize>,
    /// Scratch space for `Service::pick`.
    available: Vec<bool>,
    rng: fastrand::Rng,
}

impl<'a> Picker<'a> {
    /// `hash`: the request's key for ringHash / maglev.
    pub fn new(service: &'a Service, hash: Option<u64>) -> Self {
        Self {
            service,
            hash,
            tried: Vec::with_capacity(2),
            available: Vec::new(),
            rng: fastrand::Rng::new(),
        }
    }

    /// The next endpoint: one not tried yet while any is usable. When only
    /// tried ones are left, `again` says whether one of them may be used
    /// once more (an HTTP retry on a one-endpoint service may succeed; a
    /// connect to an endpoint that just refused would not). `None`: nothing
    /// can be used.
    pub fn next(&mut self, again: bool) -> Option<Chosen> {
        let chosen =
            self.service
                .pick(&self.tried, self.hash, &mut self.available, &mut self.rng)?;
        if !again && self.tried.contains(&chosen.index) {
            if chosen.probe {
                // Admitted as a half-open probe, but not going to be used.
                self.service.release_probe(chosen.index);
            }
            return None;
        }
        self.tried.push(chosen.index);
        Some(chosen)
    }

    /// How many endpoints were handed out so far.
    pub fn tries(&self) -> usize {
        self.tried.len()
    }

    /// Randomness for the request's other choices (retry jitter).
    pub fn rng(&mut self) -> &mut fastrand::Rng {
        &mut self.rng
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::MeshConfig;
    use crate::health::Outcome;
    use crate::state::{NodeContext, ServiceTable};

    #[test]
    fn a_probe_slot_taken_but_not_used_is_given_back() {
        let yaml = "services:\n  - name: s\n    vip: 198.19.0.1:80\n    endpoints: [{address: 10.0.0.1:80}]\n    trafficPolicy:\n      outlierDetection:\n        consecutive5xxErrors: 1\n        baseEjectionTime: 1ms\n        halfOpen: {probeRequests: 2}\n";
        let config = MeshConfig::parse(yaml, std::path::Path::new("t.yaml")).unwrap();
        let table = ServiceTable::build(&config, None, &NodeContext::default());
        let service = table.get(&"198.19.0.1:80".parse().unwrap()).unwrap();
        let _ = service.record_outcome(0, Outcome::Status(503));
        std::thread::sleep(Duration::from_millis(5));
        let _ = service.tick_outlier(Instant::now());
        let mut first = Picker::new(service, None);
        assert!(first.next(false).unwrap().probe, "half-open: a probe");
        assert!(
            first.next(false).is_none(),
            "only the tried endpoint is left and connects are not repeated"
        );
        let mut second = Picker::new(service, None);
        assert!(
            second.next(false).unwrap().probe,
            "the second probe slot is still free"
        );
    }
}

#[cfg(test)]
mod availability {
    use std::time::{Duration, Instant};

    use crate::config::MeshConfig;
    use crate::health::Outcome;
    use crate::state::{NodeContext, Service, ServiceTable};

    use super::Picker;

    fn service_of_three(table: &ServiceTable) -> &Service {
        table.get(&"198.19.0.1:80".parse().unwrap()).unwrap()
    }

    fn table() -> ServiceTable {
        let yaml = "services:\n  - name: s\n    vip: 198.19.0.1:80\n    endpoints: [{address: 10.0.0.1:80}, {address: 10.0.0.2:80}, {address: 10.0.0.3:80}]\n    trafficPolicy:\n      outlierDetection:\n        consecutive5xxErrors: 1\n        baseEjectionTime: 30ms\n        halfOpen: {successesToClose: 0}\n";
        let config = MeshConfig::parse(yaml, std::path::Path::new("t.yaml")).unwrap();
        ServiceTable::build(&config, None, &NodeContext::default())
    }

    /// Whether a pick completes (within 2 s) while this thread holds the
    /// detector's lock.
    fn picks_while_detector_held(service: &Service) -> bool {
        let held = service.outlier().unwrap();
        std::thread::scope(|scope| {
            let picker = scope.spawn(|| Picker::new(service, None).next(false));
            let deadline = Instant::now() + Duration::from_secs(2);
            while !picker.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let finished = picker.is_finished();
            drop(held);
            finished && picker.join().unwrap().is_some()
        })
    }

    #[test]
    fn picks_among_healthy_endpoints_take_no_lock() {
        let table = table();
        let service = service_of_three(&table);
        // Whoever holds the detector (an admin view, the ticker) does not
        // hold up requests while every endpoint is healthy.
        assert!(
            picks_while_detector_held(service),
            "the pick waited for the detector's lock"
        );
    }

    #[test]
    fn an_ejected_endpoint_is_avoided_until_its_ejection_ends() {
        let table = table();
        let service = service_of_three(&table);
        let event = service.record_outcome(1, Outcome::Status(503));
        assert!(event.is_some(), "ejected at the first 5xx");
        for _ in 0..200 {
            let chosen = Picker::new(service, None).next(false).unwrap();
            assert_ne!(chosen.index, 1, "the ejected endpoint was picked");
        }
        std::thread::sleep(Duration::from_millis(40));
        let _ = service.tick_outlier(Instant::now());
        let back = (0..300).any(|_| Picker::new(service, None).next(false).unwrap().index == 1);
        assert!(back, "the endpoint is picked again once its ejection ended");
        // Healthy again: picks are lock-free once more.
        assert!(
            picks_while_detector_held(service),
            "back to lock-free picks after the ejection ended"
        );
    }
}
