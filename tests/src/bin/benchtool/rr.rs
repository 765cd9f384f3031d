//! Options and output shared by `tcp-rr` and `http-rr`.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::driver::{self, Connector, DRAIN, Plan};
use crate::opts::{Failure, Opts};
use crate::stats::RunInfo;

/// Options every request/response mode takes.
pub const OPTIONS: &[&str] = &[
    "rate",
    "duration",
    "warmup",
    "connections",
    "max-in-flight",
    "threads",
];

const DEFAULT_WARMUP: Duration = Duration::from_secs(1);
/// Upper bounds on the arguments, to keep every run bounded.
const MAX_DURATION: Duration = Duration::from_secs(3600);
const MAX_WARMUP: Duration = Duration::from_secs(600);
const MAX_RATE: f64 = 1e6;
const MAX_CONNECTIONS: usize = 4096;
const DEFAULT_MAX_IN_FLIGHT: u64 = 1024;

/// Reads the pacing options.
pub fn plan(opts: &Opts) -> Result<Plan, Failure> {
    let rate: f64 = opts.bounded("rate", 0.0..=MAX_RATE)?;
    let duration = opts.seconds_or("duration", None, MAX_DURATION)?;
    let warmup = opts.seconds_or("warmup", Some(DEFAULT_WARMUP), MAX_WARMUP)?;
    let connections = opts.bounded_or("connections", 1, 1..=MAX_CONNECTIONS)?;
    let max_in_flight = opts.bounded_or("max-in-flight", DEFAULT_MAX_IN_FLIGHT, 1..=1_000_000)?;
    if duration.is_zero() {
        return Err(Failure::Usage("--duration must be > 0".into()));
    }
    if rate > 0.0 && rate * duration.as_secs_f64() < 0.5 {
        return Err(Failure::Usage(
            "--rate × --duration is less than one request".into(),
        ));
    }
    Ok(Plan {
        rate,
        warmup,
        duration,
        drain: DRAIN,
        connections,
        max_in_flight,
    })
}

/// Runs `plan` against `connector` (`target` names it in errors) and
/// prints the report.
pub async fn run<C: Connector>(
    mode: &'static str,
    target: &str,
    connector: C,
    plan: &Plan,
) -> Result<(), Failure> {
    let outcome = driver::run(Arc::new(connector), plan)
        .await
        .map_err(|e| Failure::Run(format!("connecting to {target}: {e}")))?;
    let report = outcome.stats.report(RunInfo {
        mode,
        requested_rate: plan.rate,
        warmup_s: plan.warmup.as_secs_f64(),
        elapsed_s: outcome.elapsed_s,
        connections: plan.connections,
    });
    print_line(&report)
}

/// Prints the one JSON line (flushed: the caller may be reading a pipe).
pub fn print_line(report: &impl Serialize) -> Result<(), Failure> {
    let line = serde_json::to_string(report).map_err(|e| Failure::Run(e.to_string()))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::Run(format!("writing the report: {e}")))
}

/// The error class of a failed socket operation.
pub fn io_kind(err: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match err.kind() {
        K::ConnectionRefused => "refused",
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset",
        K::TimedOut => "timeout",
        K::UnexpectedEof => "eof",
        K::HostUnreachable | K::NetworkUnreachable => "unreachable",
        _ => "io",
    }
}
