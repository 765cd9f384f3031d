//! `httptool`: an HTTP test backend and load client (tokio + hyper) for
//! end-to-end tests of the proxy's HTTP resilience features. meshtool
//! covers raw TCP; this one speaks HTTP/1.1, h2c and gRPC-shaped calls,
//! and its backend can be switched into failure modes at runtime.
//!
//! - `serve --listen <ip:port> --name <name>`: HTTP/1.1 and HTTP/2 prior
//!   knowledge on one port. `POST /control` with `mode=ok|status:<code>|
//!   reset|delay:<n>ms|close` (query or body) switches the behaviour,
//!   `GET /control` shows it, `GET /stats` counts the other requests.
//!   Per request, `x-test-status: <code>` and `x-test-delay-ms: <n>`
//!   override. Answers carry `x-backend: <name>`; the body is the request
//!   body echoed, or `<name>\n` when it was empty; `application/grpc`
//!   requests get `grpc-status: 0` trailers.
//! - `load --url <http://...> --requests <n> [--concurrency <c>] [--rate
//!   <per s>] [--http2] [--no-resend] [--header "k: v"]... [--method M]
//!   [--body-bytes n] [--timeout-ms ms] [--max-duration 30s]`: prints one
//!   JSON summary line
//!   (statuses, error classes, backends by `x-backend`, the proxy's
//!   `x-dataplane-overflow`/`x-dataplane-fallback`/`Retry-After`,
//!   latency). Closed loop with `--concurrency` workers, or open loop with
//!   `--rate` (then `--concurrency` is ignored). Stops after `--requests`
//!   or when `--max-duration` has passed; every request is bounded by
//!   `--timeout-ms`.
//! - `grpc --url <http://host/pkg.Svc/Method> [--timeout-ms ms]`: one h2c
//!   call; prints one JSON line with the status and trailers.
//!
//! - `raw --to <ip:port> --request <text> [--pad-header-bytes n]`: sends
//!   bytes that need not be valid HTTP; prints the status line received.
//!
//! - `until-ok --url <http://...> [--attempt-timeout-ms ms] [--deadline-ms
//!   ms]`: one request after another until one is answered; prints when
//!   (see `httptool/until_ok.rs`).
//!
//! Exit codes: 0 when the tool ran (failed requests are reported, the
//! caller judges), 1 when it could not (port in use), 2 on bad arguments.

// A binary's crate root looks for modules beside it, hence the paths.

#[path = "httptool/client.rs"]
mod client;
#[path = "httptool/grpc.rs"]
mod grpc;
#[path = "common/listen.rs"]
mod listen;
#[path = "httptool/load.rs"]
mod load;
#[path = "common/opts.rs"]
#[allow(dead_code, reason = "shared by the test tools; each uses a part")]
mod opts;
#[path = "httptool/raw.rs"]
mod raw;
#[path = "httptool/report.rs"]
mod report;
#[path = "httptool/respond.rs"]
mod respond;
#[path = "httptool/serve.rs"]
mod serve;
#[path = "httptool/until_ok.rs"]
mod until_ok;

use std::process::ExitCode;

use opts::{Failure, Opts};

const USAGE: &str = "usage:
  httptool serve --listen <ip:port> --name <name>
  httptool load --url <http://host[:port]/path> --requests <n> [--concurrency <c>]
                [--rate <req/s>] [--http2] [--no-resend] [--header \"k: v\"]... [--method <m>]
                [--body-bytes <n>] [--timeout-ms <ms>] [--max-duration <n>s|<n>ms]
  httptool grpc --url <http://host[:port]/pkg.Svc/Method> [--header \"k: v\"]... [--timeout-ms <ms>]
  httptool raw --to <ip:port> [--request <text, \\r\\n escaped>] [--pad-header-bytes <n>] [--timeout-ms <ms>]
  httptool until-ok --url <http://host[:port]/path> [--attempt-timeout-ms <ms>] [--deadline-ms <ms>]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        return usage("missing subcommand");
    };
    let result = Opts::parse(rest, &["http2", "no-resend"], &["header"])
        .and_then(|opts| run(command, &opts));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => usage(&msg),
        Err(Failure::Run(msg)) => {
            eprintln!("httptool {command}: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run(command: &str, opts: &Opts) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Run(format!("starting the runtime: {e}")))?;
    match command {
        "serve" => runtime.block_on(serve::run(opts)),
        "load" => runtime.block_on(load::run(opts)),
        "grpc" => runtime.block_on(grpc::run(opts)),
        "raw" => runtime.block_on(raw::run(opts)),
        "until-ok" => runtime.block_on(until_ok::run(opts)),
        other => Err(Failure::Usage(format!("unknown subcommand {other:?}"))),
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("httptool: {msg}\n{USAGE}");
    ExitCode::from(2)
}
