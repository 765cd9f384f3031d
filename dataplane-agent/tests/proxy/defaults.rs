//! The README's promise: with no traffic policy at all (every default),
//! one backend of three failing in any way fails no idempotent request,
//! under a closed-loop load of 8 concurrent callers.

use crate::support;

use std::time::Duration;

use support::{Backend, Mode, TestProxy, bounded, config, failures, load};

/// No `trafficPolicy`: what a user who copies the README's example gets.
const DEFAULTS: &str = "";
const CALLERS: usize = 8;
const EACH: usize = 150;

async fn three(bad: Mode) -> (Backend, Backend, Backend) {
    (
        Backend::start("good-1", Mode::Ok).await,
        Backend::start("good-2", Mode::Ok).await,
        Backend::start("bad", bad).await,
    )
}

async fn assert_no_failures(bad: Mode, extra: &str) -> (TestProxy, Backend) {
    let (a, b, bad) = three(bad).await;
    let proxy = TestProxy::start(&config(&[&a, &b, &bad], extra)).await;
    let results = load(&proxy, CALLERS, EACH).await;
    assert_eq!(results.len(), CALLERS * EACH);
    assert!(
        failures(&results).is_empty(),
        "failed: {:?}",
        failures(&results)
    );
    (proxy, bad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backend_answering_503_fails_nothing_and_is_ejected() {
    bounded(async {
        let (proxy, bad) = assert_no_failures(Mode::Status(503), DEFAULTS).await;
        assert!(proxy.ejections() >= 1.0, "{}", proxy.metrics());
        // Ejected after 5 consecutive 5xx: it saw a handful, not a third.
        assert!(bad.hits() < 100, "bad backend got {} requests", bad.hits());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backend_resetting_fails_nothing_and_is_ejected() {
    bounded(async {
        let (proxy, _bad) = assert_no_failures(Mode::Reset, DEFAULTS).await;
        assert!(proxy.ejections() >= 1.0, "{}", proxy.metrics());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backend_killed_mid_load_fails_nothing() {
    bounded(async {
        let (a, b, bad) = three(Mode::Ok).await;
        let proxy = TestProxy::start(&config(&[&a, &b, &bad], DEFAULTS)).await;
        let running = load(&proxy, CALLERS, EACH);
        // Killed once it has served a share of the load, so that the kill
        // lands mid-load however fast the machine is.
        let kill = async {
            for _ in 0..2000 {
                if bad.hits() >= 50 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            bad.kill();
            (a.hits() + b.hits(), bad.hits())
        };
        let (results, (good_at_kill, bad_at_kill)) = tokio::join!(running, kill);
        assert!(
            failures(&results).is_empty(),
            "failed: {:?}",
            failures(&results)
        );
        assert!(bad_at_kill >= 50, "killed after serving {bad_at_kill}");
        assert!(
            a.hits() + b.hits() > good_at_kill + 100,
            "load went on after the kill: {good_at_kill} then {}",
            a.hits() + b.hits()
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backend_blackholed_fails_nothing() {
    bounded(async {
        // No perTryTimeout set: the default one (15 s / 3 tries) ends the
        // tries the hung endpoint took, and least request keeps it from
        // taking more than a few while its first ones are outstanding.
        let (_proxy, bad) = assert_no_failures(Mode::Hang, DEFAULTS).await;
        let share = bad.hits() as f64 / (CALLERS * EACH) as f64;
        assert!(share < 0.05, "the hung endpoint took {} tries", bad.hits());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_backend_fails_nothing_and_gets_little_traffic() {
    bounded(async {
        let (_proxy, bad) =
            assert_no_failures(Mode::Delay(Duration::from_millis(500)), DEFAULTS).await;
        let share = bad.hits() as f64 / (CALLERS * EACH) as f64;
        assert!(
            share < 0.1,
            "the slow endpoint took {} requests",
            bad.hits()
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backend_refusing_connections_fails_nothing() {
    bounded(async {
        let (a, b, bad) = three(Mode::Ok).await;
        bad.kill();
        let proxy = TestProxy::start(&config(&[&a, &b, &bad], DEFAULTS)).await;
        let results = load(&proxy, CALLERS, EACH).await;
        assert!(
            failures(&results).is_empty(),
            "failed: {:?}",
            failures(&results)
        );
        assert!(proxy.ejections() >= 1.0, "{}", proxy.metrics());
    })
    .await
}
