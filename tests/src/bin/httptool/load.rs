//! `httptool load`: a bounded load generator, closed loop (`--concurrency`
//! workers, each sending the next request when the previous one finished)
//! or open loop (`--rate`: requests start on schedule whether or not
//! earlier ones finished, which is what overload protection must face).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{self, Client, Template};
use crate::opts::{Failure, Opts};
use crate::report::Tally;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(30);
/// Open loop: most requests in flight; beyond it the schedule slips
/// rather than the tool growing without bound.
const MAX_IN_FLIGHT: usize = 1024;
/// Upper bounds on the arguments, to keep every run small.
const MAX_REQUESTS: u64 = 10_000_000;
const MAX_CONCURRENCY: usize = 1024;
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Everything one request needs; shared by all workers.
struct Run {
    client: Client,
    template: Template,
    timeout: Duration,
    requests: u64,
    /// No request starts after this.
    deadline: Instant,
    tally: Mutex<Tally>,
}

impl Run {
    async fn one(&self) {
        self.tally().sent();
        let start = Instant::now();
        let outcome = client::exchange(&self.client, &self.template, self.timeout).await;
        self.tally().record(outcome, start.elapsed());
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How requests are paced.
enum Pace {
    /// `concurrency` workers, each starting a request when its previous
    /// one finished.
    Closed(usize),
    /// A request every `1 / rate` seconds, however many are in flight
    /// (`--concurrency` is ignored).
    Open(f64),
}

pub async fn run(opts: &Opts) -> Result<(), Failure> {
    let start = Instant::now();
    let (run, pace) = setup(opts, start)?;
    match pace {
        Pace::Open(rate) => open_loop(&run, rate).await,
        Pace::Closed(concurrency) => closed_loop(&run, concurrency).await,
    }
    let tally = std::mem::take(&mut *run.tally());
    let report = tally.finish(start.elapsed());
    let line = serde_json::to_string(&report).map_err(|e| Failure::Run(e.to_string()))?;
    println!("{line}");
    Ok(())
}

/// Reads and checks the options.
fn setup(opts: &Opts, start: Instant) -> Result<(Arc<Run>, Pace), Failure> {
    opts.only(&[
        "url",
        "requests",
        "concurrency",
        "rate",
        "http2",
        "no-resend",
        "header",
        "method",
        "body-bytes",
        "timeout-ms",
        "max-duration",
    ])?;
    let requests: u64 = opts.get("requests")?;
    let concurrency: usize = opts.get_or("concurrency", 1)?;
    let rate: Option<f64> = opts.raw("rate").map(|_| opts.get("rate")).transpose()?;
    let body_bytes: usize = opts.get_or("body-bytes", 0)?;
    let timeout_ms: u64 = opts.get_or("timeout-ms", millis(DEFAULT_TIMEOUT))?;
    check_bounds(requests, concurrency, rate, body_bytes, timeout_ms)?;
    let timeout = Duration::from_millis(timeout_ms);
    let max_duration = opts.duration_or("max-duration", DEFAULT_MAX_DURATION)?;
    // With a body and no --method, POST (a GET body would be odd).
    let default_method = match body_bytes {
        0 => Method::GET,
        _ => Method::POST,
    };
    let body = Bytes::from(vec![b'x'; body_bytes]);
    let template = Template::from_opts(opts, default_method, body)?;
    let (pace, max_idle) = match rate {
        Some(rate) => (Pace::Open(rate), MAX_IN_FLIGHT),
        None => (Pace::Closed(concurrency), concurrency),
    };
    let run = Run {
        client: client::client(
            opts.flag("http2"),
            !opts.flag("no-resend"),
            max_idle,
            timeout,
        ),
        template,
        timeout,
        requests,
        deadline: start + max_duration,
        tally: Mutex::new(Tally::default()),
    };
    Ok((Arc::new(run), pace))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn check_bounds(
    requests: u64,
    concurrency: usize,
    rate: Option<f64>,
    body_bytes: usize,
    timeout_ms: u64,
) -> Result<(), Failure> {
    let bad = |msg: &str| Err(Failure::Usage(msg.to_owned()));
    if !(1..=MAX_REQUESTS).contains(&requests) {
        return bad("--requests must be 1..=10000000");
    }
    if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
        return bad("--concurrency must be 1..=1024");
    }
    if rate.is_some_and(|r| !(r.is_finite() && r > 0.0 && r <= 1e6)) {
        return bad("--rate must be > 0 and <= 1000000 requests/s");
    }
    if body_bytes > MAX_BODY_BYTES {
        return bad("--body-bytes must be <= 16 MiB");
    }
    if !(1..=600_000).contains(&timeout_ms) {
        return bad("--timeout-ms must be 1..=600000");
    }
    Ok(())
}

/// `concurrency` workers share one request counter.
async fn closed_loop(run: &Arc<Run>, concurrency: usize) {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (run, next) = (run.clone(), next.clone());
        workers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < run.requests
                && Instant::now() < run.deadline
            {
                run.one().await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

/// Request `i` starts at `start + i / rate`, until `requests` were sent
/// or the deadline passed; then the ones in flight are awaited (each is
/// bounded by the request timeout).
async fn open_loop(run: &Arc<Run>, rate: f64) {
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut in_flight = JoinSet::new();
    for i in 0..run.requests {
        let Some(at) = interval.checked_mul(u32::try_from(i).unwrap_or(u32::MAX)) else {
            break;
        };
        let at = start + at;
        if at >= run.deadline {
            break;
        }
        tokio::time::sleep_until(at).await;
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        if Instant::now() >= run.deadline {
            break;
        }
        let run = run.clone();
        in_flight.spawn(async move {
            run.one().await;
            drop(slot);
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
}
