//! `burst`: rounds of many concurrent HTTP/1.1 keep-alive connections
//! that each make a few requests and then close, as a node sees when
//! clients scale up or a batch job starts. The benchmark uses it to see
//! what a proxy keeps once the connections are gone.
//!
//! Each round opens `--connections` connections at once (to the `--url`s
//! in turn) and waits until every one is open or has failed; then each
//! connection makes `--requests` requests one after the other, and when
//! all are done all close together, so the proxy holds every connection
//! of the round at the same time. Rounds repeat `--rounds` times,
//! `--pause` apart, and none starts after `--duration`. Every connect and
//! every request is bounded by `--timeout`, and a round by their sum.
//!
//! Every request counts once: `completed`, or in `errors` under the kind
//! of the failure that ended it (a failed connect fails all of its
//! connection's requests, a broken connection the rest of them).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::driver::{Connector as _, Exchange as _};
use crate::http::{self, HttpRr};
use crate::opts::{Failure, Opts};
use crate::rr;
use crate::stats::cpu_seconds;

/// Bounds on the arguments, to keep every run bounded.
const MAX_CONNECTIONS: usize = 8192;
const MAX_REQUESTS: u32 = 1000;
const MAX_ROUNDS: u64 = 1_000_000;
const MAX_URLS: usize = 64;
const MAX_DURATION: Duration = Duration::from_secs(3600);
const MAX_PAUSE: Duration = Duration::from_secs(600);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Beyond its connects and requests, how long a round may take to start
/// its tasks and close its connections.
const ROUND_SLACK: Duration = Duration::from_secs(5);

struct Plan {
    connections: usize,
    requests: u32,
    rounds: u64,
    pause: Duration,
    duration: Duration,
    timeout: Duration,
}

pub async fn run(opts: &Opts) -> Result<(), Failure> {
    opts.only(&[
        "url",
        "connections",
        "requests",
        "rounds",
        "pause",
        "duration",
        "timeout",
        "threads",
    ])?;
    let urls = opts.all("url");
    if urls.is_empty() || urls.len() > MAX_URLS {
        return Err(Failure::Usage(format!("--url: 1..={MAX_URLS} of them")));
    }
    let connectors = urls
        .iter()
        .map(|url| http::connector(url, 0).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let plan = Plan {
        connections: opts.bounded_or("connections", 100, 1..=MAX_CONNECTIONS)?,
        requests: opts.bounded_or("requests", 3, 1..=MAX_REQUESTS)?,
        rounds: opts.bounded_or("rounds", 1, 1..=MAX_ROUNDS)?,
        pause: opts.seconds_or("pause", Some(Duration::ZERO), MAX_PAUSE)?,
        duration: opts.seconds_or("duration", Some(MAX_DURATION), MAX_DURATION)?,
        timeout: opts.seconds_or("timeout", Some(DEFAULT_TIMEOUT), MAX_TIMEOUT)?,
    };
    if plan.timeout.is_zero() {
        return Err(Failure::Usage("--timeout must be > 0".into()));
    }
    dataplane_tests::proc::raise_fd_limit();
    let start = Instant::now();
    let mut tally = Tally::default();
    let mut rounds = 0;
    for round in 0..plan.rounds {
        if round > 0 {
            tokio::time::sleep(plan.pause).await;
        }
        if start.elapsed() >= plan.duration {
            break;
        }
        tally.add(one_round(&connectors, &plan).await);
        rounds += 1;
    }
    rr::print_line(&BurstReport {
        mode: "burst",
        rounds,
        connections: tally.connections,
        completed: tally.completed,
        errors: tally.errors.values().sum(),
        error_kinds: tally.errors,
        elapsed_s: (start.elapsed().as_secs_f64() * 1e3).round() / 1e3,
        cpu_s: (cpu_seconds() * 1e3).round() / 1e3,
    })
}

/// The one JSON line `burst` prints.
#[derive(Serialize)]
struct BurstReport {
    mode: &'static str,
    /// Rounds run.
    rounds: u64,
    /// Connections opened, over all rounds.
    connections: u64,
    /// Requests that got a complete 2xx response.
    completed: u64,
    /// Requests that did not, by `error_kinds`.
    errors: u64,
    error_kinds: BTreeMap<&'static str, u64>,
    elapsed_s: f64,
    /// CPU seconds (user + system) of this process.
    cpu_s: f64,
}

#[derive(Default)]
struct Tally {
    connections: u64,
    completed: u64,
    errors: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn failed(&mut self, kind: &'static str, count: u64) {
        if count > 0 {
            *self.errors.entry(kind).or_default() += count;
        }
    }

    fn add(&mut self, other: Tally) {
        self.connections += other.connections;
        self.completed += other.completed;
        for (kind, count) in other.errors {
            self.failed(kind, count);
        }
    }
}

/// One round: every connection at once, closed together at the end.
async fn one_round(connectors: &[Arc<HttpRr>], plan: &Plan) -> Tally {
    let n = plan.connections;
    let opened = Arc::new(Barrier::new(n));
    let done = Arc::new(Barrier::new(n));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        tasks.spawn(connection(
            connectors[i % connectors.len()].clone(),
            plan.requests,
            plan.timeout,
            opened.clone(),
            done.clone(),
        ));
    }
    let budget = plan.timeout * (plan.requests + 1) + ROUND_SLACK;
    let mut tally = Tally::default();
    let joined = tokio::time::timeout(budget, async {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(one) => tally.add(one),
                Err(_) => tally.failed("panic", u64::from(plan.requests)),
            }
        }
    })
    .await;
    if joined.is_err() {
        // Dropping the set aborts what is left; their requests are lost.
        let left = tasks.len() as u64;
        tally.failed("unfinished", left * u64::from(plan.requests));
    }
    tally
}

/// One connection of a round: open, wait for the others, make the
/// requests, wait for the others, close.
async fn connection(
    connector: Arc<HttpRr>,
    requests: u32,
    timeout: Duration,
    opened: Arc<Barrier>,
    done: Arc<Barrier>,
) -> Tally {
    let mut tally = Tally::default();
    let requests = u64::from(requests);
    let mut conn = match tokio::time::timeout(timeout, connector.connect()).await {
        Ok(Ok(conn)) => {
            tally.connections = 1;
            Some(conn)
        }
        Ok(Err(err)) => {
            tally.failed(rr::io_kind(&err), requests);
            None
        }
        Err(_) => {
            tally.failed("timeout", requests);
            None
        }
    };
    opened.wait().await;
    if let Some(conn) = conn.as_mut() {
        for sent in 0..requests {
            let left = requests - sent;
            if !conn.usable() {
                tally.failed("closed", left);
                break;
            }
            match tokio::time::timeout(timeout, conn.exchange()).await {
                Ok(Ok(())) => tally.completed += 1,
                Ok(Err(failed)) if failed.broken => {
                    tally.failed(failed.kind, left);
                    break;
                }
                Ok(Err(failed)) => tally.failed(failed.kind, 1),
                Err(_) => {
                    tally.failed("timeout", left);
                    break;
                }
            }
        }
    }
    done.wait().await;
    drop(conn);
    tally
}
