use std::sync::Arc;
use std::time::{Duration, Instant};

use super::yaml;
use crate::resilience::budget::{BudgetConfig, RetryBudget};

fn budget(percent: f64, min_per_sec: u32, window_secs: u64) -> RetryBudget {
    RetryBudget::new(&BudgetConfig {
        retry_percent: percent,
        min_retries_per_second: min_per_sec,
        window: Duration::from_secs(window_secs),
    })
}

fn withdraw_all(b: &RetryBudget, now: Instant) -> u64 {
    let mut n = 0;
    while b.try_withdraw(now) {
        n += 1;
        assert!(n <= 1_000_000, "budget never ran out");
    }
    n
}

#[test]
fn empty_mapping_gives_linkerd_defaults() {
    let c: BudgetConfig = yaml("{}").unwrap();
    assert_eq!(c, BudgetConfig::default());
    assert_eq!(c.retry_percent, 20.0);
    assert_eq!(c.min_retries_per_second, 10);
    assert_eq!(c.window, Duration::from_secs(10));
}

#[test]
fn parses_fractional_percent() {
    let c: BudgetConfig =
        yaml("{retryPercent: 12.5, minRetriesPerSecond: 0, window: 30s}").unwrap();
    assert_eq!(c.retry_percent, 12.5);
    assert_eq!(c.min_retries_per_second, 0);
    assert_eq!(c.window, Duration::from_secs(30));
}

#[test]
fn rejects_out_of_range_percent() {
    for bad in ["100.5", "-1", ".nan", "1000"] {
        let err = yaml::<BudgetConfig>(&format!("retryPercent: {bad}")).unwrap_err();
        assert!(
            err.starts_with("retryPercent: must be within 0..=100"),
            "{err}"
        );
    }
}

#[test]
fn rejects_window_outside_one_to_sixty_seconds() {
    for bad in ["0s", "999ms", "61s"] {
        let err = yaml::<BudgetConfig>(&format!("window: {bad}")).unwrap_err();
        assert!(err.starts_with("window: must be within 1s..=60s"), "{err}");
    }
    assert!(yaml::<BudgetConfig>("window: 1s").is_ok());
    assert!(yaml::<BudgetConfig>("window: 60s").is_ok());
}

#[test]
fn rejects_unknown_fields() {
    assert!(yaml::<BudgetConfig>("ttl: 10s").is_err());
}

#[test]
fn reserve_allows_min_retries_times_window_without_traffic() {
    let t0 = Instant::now();
    let b = budget(20.0, 10, 10);
    assert_eq!(b.available(t0), 100);
    assert_eq!(withdraw_all(&b, t0), 100);
    assert_eq!(b.available(t0), 0);
}

#[test]
fn deposits_earn_retry_percent() {
    let t0 = Instant::now();
    let b = budget(20.0, 0, 10);
    assert!(
        !b.try_withdraw(t0),
        "no traffic and no reserve: nothing to spend"
    );
    for _ in 0..100 {
        b.deposit(t0);
    }
    assert_eq!(withdraw_all(&b, t0), 20);
}

#[test]
fn available_does_not_spend() {
    let t0 = Instant::now();
    let b = budget(20.0, 1, 10);
    assert_eq!(b.available(t0), 10);
    assert_eq!(b.available(t0), 10);
    assert!(b.try_withdraw(t0));
    assert_eq!(b.available(t0), 9);
}

#[test]
fn retries_cannot_amplify_an_outage() {
    // 1000 requests spread over one 10s window, every attempt fails, each request wants its
    // 2 retries. Without a budget that is 2000 extra requests; with it at most
    // 20% * 1000 + 10/s * 10s = 300.
    let t0 = Instant::now();
    let b = budget(20.0, 10, 10);
    let mut retries = 0u64;
    for i in 0..1000u64 {
        let now = t0 + Duration::from_millis(i * 10);
        b.deposit(now);
        for _ in 0..2 {
            if b.try_withdraw(now) {
                retries += 1;
            }
        }
    }
    assert!(retries <= 300, "{retries} retries");
    // ... and the budget is not needlessly strict: the reserve and most earnings are spent.
    assert!(retries >= 280, "{retries} retries");
}

#[test]
fn sustained_outage_is_bounded_per_window() {
    // 100 requests/s for a minute, all failing: retries stay bounded by percent + floor per
    // window, i.e. at most 6 windows * 300.
    let t0 = Instant::now();
    let b = budget(20.0, 10, 10);
    let mut retries = 0u64;
    for i in 0..6000u64 {
        let now = t0 + Duration::from_millis(i * 10);
        b.deposit(now);
        retries += u64::from(b.try_withdraw(now)) + u64::from(b.try_withdraw(now));
    }
    assert!(retries <= 6 * 300, "{retries} retries");
    assert!(retries >= 6 * 250, "{retries} retries");
}

#[test]
fn old_deposits_expire_after_the_window() {
    let t0 = Instant::now();
    let b = budget(20.0, 0, 10);
    for _ in 0..100 {
        b.deposit(t0);
    }
    assert_eq!(b.available(t0 + Duration::from_secs(9)), 20);
    assert_eq!(b.available(t0 + Duration::from_secs(10)), 0);
    assert!(!b.try_withdraw(t0 + Duration::from_secs(11)));
}

#[test]
fn old_withdrawals_expire_after_the_window() {
    let t0 = Instant::now();
    let b = budget(0.0, 1, 10);
    assert_eq!(withdraw_all(&b, t0), 10);
    assert!(!b.try_withdraw(t0 + Duration::from_secs(9)));
    assert_eq!(withdraw_all(&b, t0 + Duration::from_secs(10)), 10);
}

#[test]
fn window_slides_bucket_by_bucket() {
    // Deposits at 0s and 5s; at 10s only the 5s ones still count.
    let t0 = Instant::now();
    let b = budget(100.0, 0, 10);
    for _ in 0..3 {
        b.deposit(t0);
    }
    for _ in 0..5 {
        b.deposit(t0 + Duration::from_secs(5));
    }
    assert_eq!(b.available(t0 + Duration::from_secs(9)), 8);
    assert_eq!(b.available(t0 + Duration::from_secs(10)), 5);
    assert_eq!(b.available(t0 + Duration::from_secs(15)), 0);
}

#[test]
fn time_going_backwards_counts_in_the_newest_bucket() {
    let t0 = Instant::now();
    let b = budget(100.0, 0, 10);
    b.deposit(t0);
    b.deposit(t0 + Duration::from_secs(5));
    // Another task passes a stale `now`: it is counted at 5s, not in the (sooner expiring)
    // bucket of 1s, and must not disturb the ring.
    b.deposit(t0 + Duration::from_secs(1));
    b.deposit(t0.checked_sub(Duration::from_secs(1)).unwrap_or(t0));
    assert_eq!(b.available(t0 + Duration::from_secs(9)), 4);
    assert_eq!(b.available(t0 + Duration::from_secs(14)), 3);
    assert_eq!(b.available(t0 + Duration::from_secs(15)), 0);
}

#[test]
fn huge_counts_and_unvalidated_configs_do_not_panic() {
    let t0 = Instant::now();
    let zero_window = RetryBudget::new(&BudgetConfig {
        retry_percent: f64::NAN,
        min_retries_per_second: u32::MAX,
        window: Duration::ZERO,
    });
    zero_window.deposit(t0 + Duration::from_secs(1_000_000_000));
    assert_eq!(zero_window.available(t0), 0);

    let huge_reserve = budget(100.0, u32::MAX, 60);
    assert_eq!(huge_reserve.available(t0), u64::from(u32::MAX) * 60);
    assert!(huge_reserve.try_withdraw(t0 + Duration::from_secs(86_400 * 365 * 100)));
}

#[test]
fn shared_across_threads_never_overspends() {
    let t0 = Instant::now();
    let b = Arc::new(budget(0.0, 10, 10));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let b = Arc::clone(&b);
            std::thread::spawn(move || (0..100).filter(|_| b.try_withdraw(t0)).count())
        })
        .collect();
    let granted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(granted, 100);
}
