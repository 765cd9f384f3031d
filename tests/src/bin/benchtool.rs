//! `benchtool`: the benchmark's load generator and servers. It measures
//! what a proxy hop adds, so it must add little itself: a current-thread
//! tokio runtime by default (the caller may pin it to one CPU), no
//! per-request allocation beyond what hyper does, and open-loop pacing on
//! a precise timer.
//!
//! - `echo-serve --listen <ip:port> [--max-duration <s>]`: TCP echo
//!   server; prints `listening <addr>` once bound.
//! - `tcp-rr --to <ip:port> [--size <bytes>] --rate <req/s> --duration <s>
//!   [--warmup <s>] [--connections <n>] [--max-in-flight <n>]`: request/
//!   response ping-pong (`size` bytes each way) over persistent
//!   connections with TCP_NODELAY; `--wait poll` waits for each answer in
//!   poll(2) with a timeout instead of epoll.
//! - `tcp-crr --to <ip:port> [--size <bytes>] --rate --duration [...]`:
//!   a new connection per request (connect, ping-pong, close).
//! - `http-rr --url http://<ip>[:port]/path --rate --duration [--warmup]
//!   [--connections <n>] [--body-bytes <n>] [--max-in-flight <n>]`: the
//!   same with HTTP/1.1 keep-alive GETs (POSTs with a body); non-2xx is an
//!   error.
//! - `bulk --to <ip:port> --bytes <n> [--duration <cap s>] [--verify]`:
//!   throughput of sending `n` bytes to `echo-serve` while reading them
//!   back; `--verify` checks every byte and the half-close.
//! - `burst --url http://<ip>[:port]/path [--url ...] [--connections <n>]
//!   [--requests <n>] [--rounds <n>] [--pause <s>] [--duration <s>]
//!   [--timeout <s>]`: rounds of `n` HTTP/1.1 keep-alive connections
//!   opened at once, each making a few requests, all closed together
//!   (see `burst`); reports connections, completed and failed requests.
//!
//! Every subcommand takes `--threads <n>` (default 1: current-thread
//! runtime). Durations are seconds (`2`, `0.5`, `2s`, `500ms`).
//!
//! `--rate` > 0 is an open loop: requests are due every `1/rate` seconds,
//! round-robin over the connections, and latency counts from the due time
//! (no coordinated omission; see `driver`). `--rate 0` is a closed loop as
//! fast as possible. The report is one JSON line on stdout: counts,
//! achieved rate and `latency_us` percentiles (p50/p90/p99/p999/max/mean)
//! from the due time, plus `service_us` from the actual send.
//!
//! Exit codes: 0 when it ran (failed requests are reported, the caller
//! judges), 1 on a setup failure (connect refused, port in use), 2 on bad
//! arguments.

// A binary's crate root looks for modules beside it, hence the paths.

#[path = "benchtool/bulk.rs"]
mod bulk;
#[path = "benchtool/burst.rs"]
mod burst;
#[path = "benchtool/clock.rs"]
mod clock;
#[path = "benchtool/driver.rs"]
mod driver;
#[path = "benchtool/echo.rs"]
mod echo;
#[path = "benchtool/http.rs"]
mod http;
#[path = "common/listen.rs"]
mod listen;
#[path = "common/opts.rs"]
#[allow(dead_code, reason = "shared by the test tools; each uses a part")]
mod opts;
#[path = "benchtool/rr.rs"]
mod rr;
#[path = "benchtool/stats.rs"]
mod stats;
#[path = "benchtool/tcp.rs"]
mod tcp;

use std::process::ExitCode;

use opts::{Failure, Opts};

const USAGE: &str = "usage:
  benchtool echo-serve --listen <ip:port> [--max-duration <s>]
  benchtool tcp-rr --to <ip:port> [--size <bytes>] --rate <req/s, 0 = closed loop>
                   --duration <s> [--warmup <s>] [--connections <n>] [--max-in-flight <n>]
                   [--wait epoll|poll]
  benchtool tcp-crr --to <ip:port> [--size <bytes>] --rate <req/s> --duration <s> [...]
  benchtool http-rr --url http://<ip>[:port]/path --rate <req/s> --duration <s>
                    [--warmup <s>] [--connections <n>] [--body-bytes <n>] [--max-in-flight <n>]
  benchtool bulk --to <ip:port> --bytes <n> [--duration <cap s>] [--verify]
  benchtool burst --url http://<ip>[:port]/path [--url ...] [--connections <n>] [--requests <n>]
                  [--rounds <n>] [--pause <s>] [--duration <s>] [--timeout <s>]
every subcommand: [--threads <n>] (default 1: current-thread runtime)";

const MAX_THREADS: usize = 64;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        return usage("missing subcommand");
    };
    // Only `burst` takes several targets.
    let repeatable: &[&str] = match command.as_str() {
        "burst" => &["url"],
        _ => &[],
    };
    let flags: &[&str] = match command.as_str() {
        "bulk" => &["verify"],
        _ => &[],
    };
    match Opts::parse(rest, flags, repeatable).and_then(|opts| run(command, &opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => usage(&msg),
        Err(Failure::Run(msg)) => {
            eprintln!("benchtool {command}: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run(command: &str, opts: &Opts) -> Result<(), Failure> {
    let runtime = runtime(opts.bounded_or("threads", 1, 1..=MAX_THREADS)?)?;
    match command {
        "echo-serve" => runtime.block_on(echo::run(opts)),
        "tcp-rr" => runtime.block_on(tcp::run(opts)),
        "tcp-crr" => runtime.block_on(tcp::run_crr(opts)),
        "http-rr" => runtime.block_on(http::run(opts)),
        "bulk" => runtime.block_on(bulk::run(opts)),
        "burst" => runtime.block_on(burst::run(opts)),
        other => Err(Failure::Usage(format!("unknown subcommand {other:?}"))),
    }
}

/// One thread runs everything unless asked otherwise: the benchmark pins
/// processes to CPUs, and a second worker would only compete for them.
/// Every runtime thread gets precise timers (see `clock`).
fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, Failure> {
    clock::tighten_timer_slack();
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder
                .worker_threads(n)
                .on_thread_start(clock::tighten_timer_slack);
            builder
        }
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| Failure::Run(format!("starting the runtime: {e}")))
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("benchtool: {msg}\n{USAGE}");
    ExitCode::from(2)
}
