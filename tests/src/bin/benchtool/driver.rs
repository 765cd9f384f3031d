//! The request/response engine shared by `tcp-rr` and `http-rr`.
//!
//! Open loop: request `i` is due at `start + i / rate` and belongs to
//! connection `i % connections`. Each connection runs its own requests in
//! order: it waits (on a precise [`Alarm`]) for the next one's due time,
//! or, when it is behind, sends at once. Latency counts from the due time,
//! so a response that comes late delays the requests queued behind it and
//! their latencies include that wait: no coordinated omission. A request
//! whose turn comes while more than `max_in_flight` are due but unfinished
//! is failed as `overload` instead of adding to a queue without bound.
//!
//! Closed loop (`rate` 0): every connection sends its next request as soon
//! as the previous one is done, for the highest throughput.
//!
//! Requests due during the warm-up are sent but not counted. Nothing runs
//! past the end of the window plus `drain`: requests not done by then are
//! failed as `unfinished`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

use crate::clock::{Alarm, mono_ns};
use crate::stats::{Stats, Timing};

/// How long the requests still in flight may take after the window.
pub const DRAIN: Duration = Duration::from_secs(2);
/// Bound on each connect, at setup and when reconnecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Closed loop: pause after a failed connect, so a refusing server does
/// not turn the loop into a connect storm.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(10);

/// Why a request failed; `broken` when its connection is unusable and
/// the next request must reconnect.
#[derive(Debug)]
pub struct Failed {
    pub kind: &'static str,
    pub broken: bool,
}

/// One persistent connection that can do one request/response at a time.
pub trait Exchange: Send + 'static {
    fn exchange(&mut self) -> impl Future<Output = Result<(), Failed>> + Send;

    /// False when the peer closed the connection between requests (e.g.
    /// an HTTP keep-alive timeout): the next request reconnects first
    /// instead of failing.
    fn usable(&self) -> bool {
        true
    }
}

/// Opens connections to the target.
pub trait Connector: Send + Sync + 'static {
    type Conn: Exchange;
    fn connect(&self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Requests per second over all connections; 0 for the closed loop.
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
    pub drain: Duration,
    pub connections: usize,
    pub max_in_flight: u64,
}

/// The measured requests and the measured window's length.
pub struct Outcome {
    pub stats: Stats,
    pub elapsed_s: f64,
}

/// Connects every connection (a failure is a setup error), then runs the
/// plan.
pub async fn run<C: Connector>(connector: Arc<C>, plan: &Plan) -> Result<Outcome, String> {
    let slots = connect_all(connector.as_ref(), plan).await?;
    let shared = Arc::new(Shared::new(plan, mono_ns()));
    let mut tasks = JoinSet::new();
    for (index, (conn, alarm)) in slots.into_iter().enumerate() {
        let worker = Worker {
            index: index as u64,
            conn: Some(conn),
            connector: connector.clone(),
            shared: shared.clone(),
        };
        tasks.spawn(worker.run(alarm));
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| format!("a connection task failed: {e}"))?;
    }
    let stats = std::mem::replace(&mut *shared.stats(), Stats::new());
    let (window_start, window_end) = shared.pace.window();
    let end = window_end.max(stats.last_done_ns);
    let elapsed_s = end.saturating_sub(window_start) as f64 / 1e9;
    Ok(Outcome { stats, elapsed_s })
}

/// Opens the connections one by one, and for the open loop an alarm per
/// connection, so that running out of file descriptors is a setup error.
async fn connect_all<C: Connector>(
    connector: &C,
    plan: &Plan,
) -> Result<Vec<(C::Conn, Option<Alarm>)>, String> {
    let mut slots = Vec::with_capacity(plan.connections);
    for i in 0..plan.connections {
        let which = || format!("connection {} of {}", i + 1, plan.connections);
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect())
            .await
            .map_err(|_| format!("{}: connect timed out", which()))?
            .map_err(|e| format!("{}: {e}", which()))?;
        let alarm = match plan.rate > 0.0 {
            true => Some(Alarm::new().map_err(|e| format!("creating a timerfd: {e}"))?),
            false => None,
        };
        slots.push((conn, alarm));
    }
    Ok(slots)
}

/// When requests are due.
enum Pace {
    Open(Schedule),
    /// The measured window, `[start, end)` in ns.
    Closed {
        start: u64,
        end: u64,
    },
}

impl Pace {
    /// The measured window in ns: its start and its nominal end.
    fn window(&self) -> (u64, u64) {
        match self {
            Pace::Open(schedule) => (schedule.at(schedule.first_measured), schedule.end()),
            Pace::Closed { start, end } => (*start, *end),
        }
    }
}

/// The open loop's timetable: request `i` is due at `at(i)`; those before
/// `first_measured` are the warm-up; there are `total` in all.
#[derive(Debug)]
struct Schedule {
    start_ns: u64,
    interval_ns: f64,
    first_measured: u64,
    total: u64,
}

impl Schedule {
    fn new(plan: &Plan, start_ns: u64) -> Schedule {
        let first_measured = (plan.warmup.as_secs_f64() * plan.rate).ceil() as u64;
        let measured = (plan.duration.as_secs_f64() * plan.rate).round() as u64;
        Schedule {
            start_ns,
            interval_ns: 1e9 / plan.rate,
            first_measured,
            total: first_measured + measured,
        }
    }

    fn at(&self, i: u64) -> u64 {
        self.start_ns + (i as f64 * self.interval_ns) as u64
    }

    fn end(&self) -> u64 {
        self.at(self.total)
    }

    /// How many requests are due at `now`.
    fn due(&self, now: u64) -> u64 {
        let Some(since) = now.checked_sub(self.start_ns) else {
            return 0;
        };
        let due = (since as f64 / self.interval_ns) as u64 + 1;
        due.min(self.total)
    }

    /// Measured requests of connection `conn` (of `n`) from index `from` on.
    fn measured_from(&self, from: u64, conn: u64, n: u64) -> u64 {
        count_congruent(from.max(self.first_measured), self.total, conn, n)
    }
}

/// How many `j` in `[from, to)` have `j % n == rem` (`rem < n`).
fn count_congruent(from: u64, to: u64, rem: u64, n: u64) -> u64 {
    let first = from + (rem + n - from % n) % n;
    match first < to {
        true => (to - 1 - first) / n + 1,
        false => 0,
    }
}

/// State all connections share.
struct Shared {
    pace: Pace,
    connections: u64,
    max_in_flight: u64,
    /// No request runs past this (ns).
    deadline_ns: u64,
    /// Requests finished or failed, warm-up included (for the overload
    /// check).
    finished: AtomicU64,
    stats: Mutex<Stats>,
}

impl Shared {
    fn new(plan: &Plan, start_ns: u64) -> Shared {
        let pace = match plan.rate > 0.0 {
            true => Pace::Open(Schedule::new(plan, start_ns)),
            false => {
                let start = start_ns + duration_ns(plan.warmup);
                let end = start + duration_ns(plan.duration);
                Pace::Closed { start, end }
            }
        };
        let deadline_ns = pace.window().1 + duration_ns(plan.drain);
        Shared {
            pace,
            connections: plan.connections as u64,
            max_in_flight: plan.max_in_flight,
            deadline_ns,
            finished: AtomicU64::new(0),
            stats: Mutex::new(Stats::new()),
        }
    }

    fn stats(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether more than `max_in_flight` requests are due and unfinished.
    fn overloaded(&self, schedule: &Schedule) -> bool {
        let due = schedule.due(mono_ns());
        let finished = self.finished.load(Ordering::Relaxed);
        due.saturating_sub(finished) > self.max_in_flight
    }

    /// A tokio sleep until the deadline (tokio's millisecond timer is
    /// precise enough for a cut-off).
    fn deadline(&self) -> Sleep {
        let left = Duration::from_nanos(self.deadline_ns.saturating_sub(mono_ns()));
        tokio::time::sleep_until(Instant::now() + left)
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One connection's task.
struct Worker<C: Connector> {
    index: u64,
    /// `None` after a failure broke it: the next request reconnects.
    conn: Option<C::Conn>,
    connector: Arc<C>,
    shared: Arc<Shared>,
}

impl<C: Connector> Worker<C> {
    async fn run(mut self, alarm: Option<Alarm>) {
        let shared = self.shared.clone();
        let deadline = shared.deadline();
        tokio::pin!(deadline);
        match (&shared.pace, alarm) {
            (Pace::Open(schedule), Some(alarm)) => {
                self.open_loop(schedule, alarm, deadline).await;
            }
            (Pace::Closed { start, end }, _) => {
                self.closed_loop(*start, *end, deadline).await;
            }
            // connect_all makes an alarm whenever the pace is open.
            (Pace::Open(_), None) => {}
        }
    }

    async fn open_loop(
        &mut self,
        schedule: &Schedule,
        mut alarm: Alarm,
        mut deadline: Pin<&mut Sleep>,
    ) {
        let n = self.shared.connections;
        // When this connection's previous request finished.
        let mut prev_done = 0;
        let mut i = self.index;
        while i < schedule.total {
            let due = schedule.at(i);
            if alarm.sleep_until(due).await.is_err() {
                // Never send early: fall back to the coarse timer.
                let left = Duration::from_nanos(due.saturating_sub(mono_ns()));
                tokio::time::sleep(left).await;
            }
            let measured = i >= schedule.first_measured;
            if self.shared.overloaded(schedule) {
                let timing = Timing::queued(due, due);
                self.record(measured, timing, Err("overload"));
                i += n;
                continue;
            }
            let timing = Timing::open(due, mono_ns(), prev_done);
            let result = tokio::select! {
                biased;
                result = self.attempt() => result,
                () = &mut deadline => {
                    let left = schedule.measured_from(i, self.index, n);
                    self.shared.stats().failed("unfinished", left);
                    return;
                }
            };
            prev_done = self.record(measured, timing, result);
            i += n;
        }
    }

    async fn closed_loop(&mut self, start: u64, end: u64, mut deadline: Pin<&mut Sleep>) {
        loop {
            let sent = mono_ns();
            if sent >= end {
                return;
            }
            let measured = sent >= start;
            let result = tokio::select! {
                biased;
                result = self.attempt() => result,
                () = &mut deadline => {
                    if measured {
                        self.shared.stats().failed("unfinished", 1);
                    }
                    return;
                }
            };
            let refused = result.is_err() && self.conn.is_none();
            self.record(measured, Timing::closed(sent), result);
            if refused {
                tokio::time::sleep(RECONNECT_BACKOFF).await;
            }
        }
    }

    /// One request, reconnecting first if the last one broke the
    /// connection.
    async fn attempt(&mut self) -> Result<(), &'static str> {
        if self.conn.as_ref().is_some_and(|conn| !conn.usable()) {
            self.conn = None;
        }
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let connect = tokio::time::timeout(CONNECT_TIMEOUT, self.connector.connect());
                let Ok(Ok(conn)) = connect.await else {
                    return Err("connect");
                };
                self.conn.insert(conn)
            }
        };
        let failed = match conn.exchange().await {
            Ok(()) => return Ok(()),
            Err(failed) => failed,
        };
        if failed.broken {
            self.conn = None;
        }
        Err(failed.kind)
    }

    /// Counts a request that finished now; returns now.
    fn record(&self, measured: bool, timing: Timing, result: Result<(), &'static str>) -> u64 {
        self.shared.finished.fetch_add(1, Ordering::Relaxed);
        let done = mono_ns();
        if !measured {
            return done;
        }
        let mut stats = self.shared.stats();
        match result {
            Ok(()) => stats.completed(timing, done),
            Err(kind) => stats.failed(kind, 1),
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers at once, except that request number `stall_at` (counted
    /// over all connections) takes `stall`.
    struct Stalling {
        calls: Arc<AtomicU64>,
        stall_at: u64,
        stall: Duration,
    }

    impl Connector for Stalling {
        type Conn = StallingConn;
        async fn connect(&self) -> io::Result<StallingConn> {
            Ok(StallingConn {
                calls: self.calls.clone(),
                stall_at: self.stall_at,
                stall: self.stall,
            })
        }
    }

    struct StallingConn {
        calls: Arc<AtomicU64>,
        stall_at: u64,
        stall: Duration,
    }

    impl Exchange for StallingConn {
        async fn exchange(&mut self) -> Result<(), Failed> {
            if self.calls.fetch_add(1, Ordering::Relaxed) == self.stall_at {
                tokio::time::sleep(self.stall).await;
            }
            Ok(())
        }
    }

    fn plan(rate: f64, duration_ms: u64) -> Plan {
        Plan {
            rate,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(duration_ms),
            drain: Duration::from_millis(300),
            connections: 1,
            max_in_flight: 1024,
        }
    }

    fn run_with(stall_at: u64, stall_ms: u64, plan: &Plan) -> Result<Outcome, String> {
        let connector = Arc::new(Stalling {
            calls: Arc::new(AtomicU64::new(0)),
            stall_at,
            stall: Duration::from_millis(stall_ms),
        });
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(run(connector, plan))
    }

    const MS: u64 = 1000;

    #[test]
    fn latency_counts_from_the_schedule_so_a_stall_delays_the_queue() -> Result<(), String> {
        // 30 requests 10 ms apart; request 5 (due at 50 ms) takes 100 ms,
        // so requests 6.. wait behind it until 150 ms: request k waits
        // at least 150 - 10k ms from its due time.
        let outcome = run_with(5, 100, &plan(100.0, 300))?;
        let stats = &outcome.stats;
        assert_eq!(stats.completed_count(), 30);
        assert_eq!(stats.error_count(), 0);
        let latency = stats.latency();
        assert!(latency.max() >= 100 * MS, "max {}", latency.max());
        // Requests 5..=10 waited at least 100, 90, ..., 50 ms.
        let slow = latency.count_between(45 * MS, u64::MAX);
        assert!(slow >= 6, "only {slow} requests include the stall");
        // Requests 6..=14 all waited for it (latency >= 10 ms).
        let delayed = latency.count_between(9 * MS, u64::MAX);
        assert!(delayed >= 10, "only {delayed} requests include the stall");
        Ok(())
    }

    #[test]
    fn overload_fails_requests_instead_of_queueing_them() -> Result<(), String> {
        // During a 100 ms stall ten more requests fall due; with at most 3
        // in flight, most of the backlog is failed.
        let mut plan = plan(100.0, 300);
        plan.max_in_flight = 3;
        let outcome = run_with(5, 100, &plan)?;
        let stats = &outcome.stats;
        assert_eq!(stats.completed_count() + stats.error_count(), 30);
        assert!(stats.error_count() >= 5, "{} errors", stats.error_count());
        assert!(stats.latency().max() < 100 * MS + 40 * MS);
        Ok(())
    }

    #[test]
    fn a_hung_request_fails_the_rest_at_the_deadline() -> Result<(), String> {
        let outcome = run_with(2, 60_000, &plan(100.0, 100))?;
        assert_eq!(outcome.stats.completed_count(), 2);
        assert_eq!(outcome.stats.error_count(), 8);
        Ok(())
    }

    #[test]
    fn warmup_requests_are_not_counted() -> Result<(), String> {
        let mut plan = plan(200.0, 100);
        plan.warmup = Duration::from_millis(50);
        plan.connections = 3;
        let outcome = run_with(u64::MAX, 0, &plan)?;
        assert_eq!(outcome.stats.completed_count(), 20);
        assert!(outcome.elapsed_s >= 0.099, "elapsed {}", outcome.elapsed_s);
        Ok(())
    }

    #[test]
    fn the_closed_loop_runs_back_to_back() -> Result<(), String> {
        let outcome = run_with(u64::MAX, 0, &plan(0.0, 50))?;
        assert!(outcome.stats.completed_count() > 100);
        Ok(())
    }

    #[test]
    fn congruent_counts() {
        assert_eq!(count_congruent(0, 10, 0, 1), 10);
        assert_eq!(count_congruent(0, 10, 1, 3), 3); // 1 4 7
        assert_eq!(count_congruent(2, 10, 1, 3), 2); // 4 7
        assert_eq!(count_congruent(5, 10, 1, 3), 1); // 7
        assert_eq!(count_congruent(10, 10, 1, 3), 0);
    }
}
