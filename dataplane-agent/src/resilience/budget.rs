//! Retry budget: retries may be at most a fixed fraction of recent real traffic.
//!
//! Per-request limits (`attempts`) alone let a full outage multiply load by `attempts + 1`
//! exactly when the service can least afford it. A budget bounds retries *across* requests
//! instead, as in Finagle's `RetryBudget` and linkerd2's `retryBudget` (tower's `TpsBudget`):
//! within the last `window`, retries may not exceed
//!
//! ```text
//!   minRetriesPerSecond * window  +  retryPercent% * (original requests in window)
//! ```
//!
//! The fixed reserve lets low-traffic services still retry; the percentage keeps the retry load
//! proportional to real traffic, so in a 100% failure outage retries add at most `retryPercent`.
//! Defaults are linkerd2's: 20%, 10 retries/s, 10s.
//!
//! The window slides in [`BUCKETS`] time buckets (like tower), so an entry expires between
//! `window * 9/10` and `window` after it was recorded.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Number of time buckets the window is divided into.
pub const BUCKETS: usize = 10;

/// Window bounds, as in tower's `TpsBudget` (linkerd2's `ttl`): shorter windows make the
/// percentage meaningless at low rates, longer ones keep outage-era deposits around too long.
const MIN_WINDOW: Duration = Duration::from_secs(1);
const MAX_WINDOW: Duration = Duration::from_secs(60);

/// Retry budget configuration.
///
/// ```yaml
/// retryPercent: 20          # 0..=100; retries allowed per 100 original requests
/// minRetriesPerSecond: 10   # reserve, available even without traffic
/// window: 10s               # 1s..=60s
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    try_from = "RawBudgetConfig"
)]
pub struct BudgetConfig {
    /// Retries allowed per 100 original requests in the window. Capped at 100: above that,
    /// retries could outnumber requests and the budget would no longer prevent amplification.
    pub retry_percent: f64,
    /// Floor: `minRetriesPerSecond * window` retries are always allowed per window.
    pub min_retries_per_second: u32,
    /// How long deposits and withdrawals count.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            retry_percent: 20.0,
            min_retries_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawBudgetConfig {
    retry_percent: f64,
    min_retries_per_second: u32,
    #[serde(with = "humantime_serde")]
    window: Duration,
}

impl Default for RawBudgetConfig {
    fn default() -> Self {
        let d = BudgetConfig::default();
        Self {
            retry_percent: d.retry_percent,
            min_retries_per_second: d.min_retries_per_second,
            window: d.window,
        }
    }
}

impl TryFrom<RawBudgetConfig> for BudgetConfig {
    type Error = String;

    fn try_from(raw: RawBudgetConfig) -> Result<Self, Self::Error> {
        if !(0.0..=100.0).contains(&raw.retry_percent) {
            return Err(format!(
                "retryPercent: must be within 0..=100, got {}",
                raw.retry_percent
            ));
        }
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&raw.window) {
            return Err(format!(
                "window: must be within 1s..=60s, got {:?}",
                raw.window
            ));
        }
        Ok(Self {
            retry_percent: raw.retry_percent,
            min_retries_per_second: raw.min_retries_per_second,
            window: raw.window,
        })
    }
}

/// A service's retry budget, shared by all its requests (`&self` methods, `Send + Sync`).
///
/// Call [`deposit`](Self::deposit) once per original request and
/// [`try_withdraw`](Self::try_withdraw) before each retry.
#[derive(Debug)]
pub struct RetryBudget {
    /// `minRetriesPerSecond * window`, precomputed.
    reserve: u64,
    percent: f64,
    bucket_width: Duration,
    // A mutex rather than atomics: the critical section is a few dozen instructions, and
    // rotating a bucket while others count in it cannot be done consistently with per-field
    // atomics.
    window: Mutex<Window>,
}

impl RetryBudget {
    /// Builds a budget. Total for any config: an unvalidated zero window is treated as 1ns
    /// buckets and a NaN percent as 0.
    pub fn new(config: &BudgetConfig) -> Self {
        let window_ms = config.window.as_millis();
        let reserve = u128::from(config.min_retries_per_second).saturating_mul(window_ms) / 1000;
        // usize -> u32 is lossless for BUCKETS = 10.
        let bucket_width = (config.window / BUCKETS as u32).max(Duration::from_nanos(1));
        Self {
            reserve: u64::try_from(reserve).unwrap_or(u64::MAX),
            percent: config.retry_percent,
            bucket_width,
            window: Mutex::new(Window::default()),
        }
    }

    /// Records an original (non-retry) request, earning `retryPercent / 100` of a retry.
    pub fn deposit(&self, now: Instant) {
        let mut window = self.lock();
        let slot = window.rotate(now, self.bucket_width);
        let bucket = &mut window.buckets[slot];
        bucket.deposits = bucket.deposits.saturating_add(1);
    }

    /// Spends one retry if the budget allows it; returns whether the retry may proceed.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut window = self.lock();
        let slot = window.rotate(now, self.bucket_width);
        if self.available_in(&window) == 0 {
            return false;
        }
        let bucket = &mut window.buckets[slot];
        bucket.withdrawals = bucket.withdrawals.saturating_add(1);
        true
    }

    /// Retries that would currently be allowed (for metrics and tests); spends nothing.
    pub fn available(&self, now: Instant) -> u64 {
        let mut window = self.lock();
        window.rotate(now, self.bucket_width);
        self.available_in(&window)
    }

    fn available_in(&self, window: &Window) -> u64 {
        let (deposits, withdrawals) = window.totals();
        // f64 -> u64 `as` saturates and maps NaN to 0: exactly the rounding-down we want.
        let earned = (deposits as f64 * self.percent / 100.0) as u64;
        self.reserve
            .saturating_add(earned)
            .saturating_sub(withdrawals)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // Nothing panics while the lock is held, but never propagate poisoning into the proxy.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    deposits: u64,
    withdrawals: u64,
}

/// Ring of buckets; bucket `epoch % BUCKETS` holds the counts of time slice `epoch`.
#[derive(Debug, Default)]
struct Window {
    /// Instant of the first call; epochs count bucket widths since then.
    origin: Option<Instant>,
    /// Newest epoch seen. Callers on other threads may pass a slightly older `now`; they are
    /// counted in the newest bucket so that time never runs backwards inside the window.
    current: u64,
    buckets: [Bucket; BUCKETS],
}

impl Window {
    /// Advances to `now`'s epoch, clearing the slot it reuses; returns the current slot index.
    fn rotate(&mut self, now: Instant, width: Duration) -> usize {
        let origin = *self.origin.get_or_insert(now);
        let elapsed = now.saturating_duration_since(origin).as_nanos() / width.as_nanos();
        self.current = self.current.max(u64::try_from(elapsed).unwrap_or(u64::MAX));
        let epoch = self.current;
        // The remainder is < BUCKETS, so the cast is lossless.
        let slot = (epoch % BUCKETS as u64) as usize;
        if self.buckets[slot].epoch != epoch {
            self.buckets[slot] = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        slot
    }

    /// Sums the buckets still inside the window (the current epoch and the `BUCKETS - 1` before).
    fn totals(&self) -> (u64, u64) {
        self.buckets
            .iter()
            .filter(|b| self.current.saturating_sub(b.epoch) < BUCKETS as u64)
            .fold((0, 0), |(d, w), b| {
                (
                    d.saturating_add(b.deposits),
                    w.saturating_add(b.withdrawals),
                )
            })
    }
}
