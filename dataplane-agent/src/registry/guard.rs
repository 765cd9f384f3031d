//! Protection against bad pushes: a registry change that removes all of a
//! service's endpoints, or more than `maxShare` of them, within `hold`
//! (in one transaction or key by key) is held for `hold` before it
//! applies; meanwhile the service keeps its old endpoints and gets the new
//! ones too (a blue/green swap in one push routes to both, and outlier
//! detection sorts out the dead). A botched deploy script or a broken
//! registrar that wipes a service would otherwise take its traffic down at
//! the speed of a watch event; held, it gives an operator (or the
//! registrar's own retry) time, and the proxy keeps routing to endpoints
//! that usually still run. A removal that is real applies after `hold`.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config;

/// Tuning of the guard.
#[derive(Debug, Clone, Copy)]
pub struct GuardConfig {
    /// How long a large removal waits; zero applies every change at once.
    pub hold: Duration,
    /// Percent of a service's endpoints whose removal at once is held
    /// (removing all of them is held whatever this says).
    pub max_share: f64,
}

/// Remembers what was published and which removals wait.
#[derive(Debug, Default)]
pub struct RemovalGuard {
    cfg: Option<GuardConfig>,
    /// Per service (`namespace/name`): when its held removal started.
    held_since: HashMap<String, Instant>,
    /// Per service: the endpoints removals are measured against, and
    /// since when (renewed once older than `hold`, grown by what is added
    /// meanwhile, never changed while held), so that deleting keys one by
    /// one counts as one removal.
    reference: HashMap<String, (BTreeSet<SocketAddrV4>, Instant)>,
}

/// What [`RemovalGuard::apply`] decided.
#[derive(Debug)]
pub struct Guarded {
    /// What the proxy should use.
    pub services: Vec<config::Service>,
    /// When a held removal is due (call `apply` again then).
    pub next_deadline: Option<Instant>,
    /// Services whose removal started to be held by this call.
    pub newly_held: usize,
}

fn id(s: &config::Service) -> String {
    format!("{}/{}", s.namespace, s.name)
}

/// `new` with the endpoints of `old` it lacks added back.
fn union(old: &config::Service, mut new: config::Service) -> config::Service {
    let have = addresses(&new);
    new.endpoints.extend(
        old.endpoints
            .iter()
            .filter(|e| !have.contains(&e.address))
            .cloned(),
    );
    new
}

fn addresses(s: &config::Service) -> BTreeSet<SocketAddrV4> {
    s.endpoints.iter().map(|e| e.address).collect()
}

impl RemovalGuard {
    pub fn new(cfg: GuardConfig) -> Self {
        Self {
            cfg: Some(cfg),
            held_since: HashMap::new(),
            reference: HashMap::new(),
        }
    }

    /// Turns the registry's `wanted` services into what to publish, given
    /// what was `published` before: each service whose change removes too
    /// much keeps its published version until its hold ends. A service
    /// gone from the registry counts as all its endpoints removed.
    pub fn apply(
        &mut self,
        published: &[config::Service],
        wanted: Vec<config::Service>,
        now: Instant,
    ) -> Guarded {
        let Some(cfg) = self.cfg.filter(|c| !c.hold.is_zero()) else {
            return Guarded {
                services: wanted,
                next_deadline: None,
                newly_held: 0,
            };
        };
        let before: HashMap<String, &config::Service> =
            published.iter().map(|s| (id(s), s)).collect();
        let mut services = Vec::with_capacity(wanted.len());
        let mut still_held = HashMap::new();
        let mut next_deadline: Option<Instant> = None;
        let mut newly_held = 0;
        let mut seen = BTreeSet::new();
        let mut hold = |old: &config::Service, what: &str| -> bool {
            let key = id(old);
            let since = *self.held_since.get(&key).unwrap_or(&now);
            let due = since + cfg.hold;
            if now >= due {
                info!(service = %key, "registry: held removal applies now ({what})");
                return false;
            }
            if since == now {
                newly_held += 1;
                warn!(service = %key, hold = ?cfg.hold, "registry: {what} at once; held before it applies");
            }
            still_held.insert(key, since);
            next_deadline = Some(next_deadline.map_or(due, |d| d.min(due)));
            true
        };
        for new in wanted {
            let key = id(&new);
            seen.insert(key.clone());
            let Some(old) = before.get(&key) else {
                services.push(new);
                continue;
            };
            let held_now = self.held_since.contains_key(&key);
            let reference = self
                .reference
                .entry(key.clone())
                .or_insert_with(|| (addresses(old), now));
            // Endpoints added within the window join the reference: a
            // removal is measured against everything the service had then.
            if !held_now {
                if now.saturating_duration_since(reference.1) >= cfg.hold {
                    *reference = (addresses(old), now);
                } else {
                    reference.0.extend(addresses(old));
                }
            }
            let new_set = addresses(&new);
            let removed = reference.0.difference(&new_set).count();
            let too_many = !reference.0.is_empty()
                && removed > 0
                && (new_set.is_empty()
                    || removed as f64 * 100.0 > cfg.max_share * reference.0.len() as f64);
            if too_many && hold(old, "most endpoints removed") {
                services.push(union(old, new));
            } else {
                if too_many {
                    // Applied after its hold: measure from here on.
                    self.reference.insert(key, (new_set, now));
                }
                services.push(new);
            }
        }
        for old in published {
            if !seen.contains(&id(old)) && !old.endpoints.is_empty() && hold(old, "service removed")
            {
                services.push(old.clone());
            }
        }
        self.held_since = still_held;
        self.reference.retain(|key, _| seen.contains(key));
        Guarded {
            services,
            next_deadline,
            newly_held,
        }
    }

    /// Services whose removal is being held now.
    pub fn held(&self) -> usize {
        self.held_since.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, endpoints: &[u8]) -> config::Service {
        config::Service {
            name: name.into(),
            namespace: "t".into(),
            vip: SocketAddrV4::new([198, 19, 0, endpoints.len() as u8].into(), 80),
            protocol: config::Protocol::Http,
            upstream_protocol: config::UpstreamProtocol::Auto,
            endpoints: endpoints
                .iter()
                .map(|&i| config::Endpoint {
                    address: SocketAddrV4::new([10, 0, 0, i].into(), 80),
                    weight: 1,
                    region: String::new(),
                    zone: String::new(),
                })
                .collect(),
            traffic_policy: config::TrafficPolicy::default(),
            tenant: String::new(),
            export_to: Vec::new(),
        }
    }

    fn guard() -> RemovalGuard {
        RemovalGuard::new(GuardConfig {
            hold: Duration::from_secs(30),
            max_share: 50.0,
        })
    }

    fn endpoints(out: &Guarded, name: &str) -> usize {
        out.services
            .iter()
            .find(|s| s.name == name)
            .map_or(usize::MAX, |s| s.endpoints.len())
    }

    #[test]
    fn small_changes_apply_at_once() {
        let mut g = guard();
        let t0 = Instant::now();
        let out = g.apply(
            &[svc("a", &[1, 2, 3, 4])],
            vec![svc("a", &[1, 2, 3, 5])],
            t0,
        );
        assert_eq!(endpoints(&out, "a"), 4);
        assert_eq!(out.services[0].endpoints[3].address.ip().octets()[3], 5);
        // A window later, measured against what it has then.
        let later = t0 + Duration::from_secs(30);
        let out = g.apply(&out.services, vec![svc("a", &[1, 2])], later);
        assert_eq!(endpoints(&out, "a"), 2, "half is not more than 50 %");
        assert_eq!(out.newly_held, 0);
    }

    #[test]
    fn removing_all_endpoints_is_held_then_applies() {
        let mut g = guard();
        let t0 = Instant::now();
        let published = vec![svc("a", &[1, 2, 3])];
        let out = g.apply(&published, vec![svc("a", &[])], t0);
        assert_eq!(endpoints(&out, "a"), 3, "held");
        assert_eq!(out.newly_held, 1);
        assert_eq!(out.next_deadline, Some(t0 + Duration::from_secs(30)));
        // Still held later, counted once.
        let later = t0 + Duration::from_secs(10);
        let out = g.apply(&out.services, vec![svc("a", &[])], later);
        assert_eq!((endpoints(&out, "a"), out.newly_held), (3, 0));
        let due = t0 + Duration::from_secs(30);
        let out = g.apply(&out.services, vec![svc("a", &[])], due);
        assert_eq!(endpoints(&out, "a"), 0, "applied after the hold");
        assert_eq!(g.held(), 0);
    }

    #[test]
    fn a_removal_undone_during_the_hold_is_forgotten() {
        let mut g = guard();
        let t0 = Instant::now();
        let published = vec![svc("a", &[1, 2, 3, 4])];
        let out = g.apply(&published, vec![svc("a", &[1])], t0);
        assert_eq!(endpoints(&out, "a"), 4, "75 % removed: held");
        let out = g.apply(
            &out.services,
            vec![svc("a", &[1, 2, 3, 4])],
            t0 + Duration::from_secs(5),
        );
        assert_eq!(endpoints(&out, "a"), 4);
        assert_eq!(g.held(), 0);
    }

    #[test]
    fn a_vanished_service_is_held_and_new_ones_are_not() {
        let mut g = guard();
        let t0 = Instant::now();
        let out = g.apply(&[svc("a", &[1, 2])], vec![svc("b", &[])], t0);
        assert_eq!(endpoints(&out, "a"), 2, "removed service held");
        assert_eq!(endpoints(&out, "b"), 0, "a new service applies at once");
        let out = g.apply(
            &out.services,
            vec![svc("b", &[])],
            t0 + Duration::from_secs(31),
        );
        assert_eq!(endpoints(&out, "a"), usize::MAX, "gone after the hold");
    }

    #[test]
    fn keys_deleted_one_by_one_are_one_removal() {
        let mut g = guard();
        let t0 = Instant::now();
        let mut published = vec![svc("a", &[1, 2, 3, 4])];
        let mut held = 0;
        for (i, left) in [&[1u8, 2, 3][..], &[1, 2], &[1], &[]].iter().enumerate() {
            let out = g.apply(
                &published,
                vec![svc("a", left)],
                t0 + Duration::from_millis(10 * i as u64),
            );
            held += out.newly_held;
            published = out.services;
        }
        assert_eq!(held, 1);
        assert_eq!(
            endpoints(
                &Guarded {
                    services: published,
                    next_deadline: None,
                    newly_held: 0
                },
                "a"
            ),
            2,
            "held at the third deletion: 3 of 4 gone"
        );
    }

    #[test]
    fn a_swap_in_one_push_routes_to_old_and_new_while_held() {
        let mut g = guard();
        let t0 = Instant::now();
        let out = g.apply(&[svc("a", &[1, 2])], vec![svc("a", &[7, 8])], t0);
        assert_eq!(out.newly_held, 1);
        assert_eq!(
            endpoints(&out, "a"),
            4,
            "new ones in at once, old ones kept"
        );
        let out = g.apply(
            &out.services,
            vec![svc("a", &[7, 8])],
            t0 + Duration::from_secs(30),
        );
        assert_eq!(endpoints(&out, "a"), 2);
    }

    #[test]
    fn endpoints_added_just_before_a_removal_count() {
        let mut g = guard();
        let t0 = Instant::now();
        let mut published = vec![svc("a", &[])];
        for left in [&[1u8][..], &[1, 2], &[1, 2, 3]] {
            published = g.apply(&published, vec![svc("a", left)], t0).services;
        }
        let out = g.apply(&published, vec![svc("a", &[])], t0 + Duration::from_secs(1));
        assert_eq!((endpoints(&out, "a"), out.newly_held), (3, 1));
    }

    #[test]
    fn hold_zero_disables_the_guard() {
        let mut g = RemovalGuard::new(GuardConfig {
            hold: Duration::ZERO,
            max_share: 50.0,
        });
        let out = g.apply(&[svc("a", &[1, 2])], vec![svc("a", &[])], Instant::now());
        assert_eq!(endpoints(&out, "a"), 0);
    }
}
