//! `httptool until-ok --url <http://...> [--attempt-timeout-ms 20]
//! [--deadline-ms 60000]`: prints `ready` once running, then sends one
//! GET after another, each on a new connection and bounded by the attempt
//! timeout, until one is answered with a 2xx; prints one JSON line with
//! the wall-clock time of that answer (`answered_unix_us`) and the number
//! of attempts, or `"ok": false` at the deadline. For measuring how soon
//! a change takes effect: the caller starts it, waits for `ready`, notes
//! the time and makes the change; no process start-up is in the figure.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Uri};

use crate::client;
use crate::opts::{Failure, Opts};

pub async fn run(opts: &Opts) -> Result<(), Failure> {
    opts.only(&["url", "attempt-timeout-ms", "deadline-ms"])?;
    let url: Uri = opts.get("url")?;
    let attempt = Duration::from_millis(opts.bounded_or("attempt-timeout-ms", 20, 1..=60_000)?);
    let deadline = Instant::now()
        + Duration::from_millis(opts.bounded_or("deadline-ms", 60_000, 1..=600_000)?);
    println!("ready");
    let mut attempts: u64 = 0;
    loop {
        attempts += 1;
        // No pooled connection: each attempt connects anew, as a new
        // client of the service would.
        let client = client::client(false, false, 0, attempt);
        let request = Request::get(url.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|e| Failure::Usage(format!("--url: {e}")))?;
        let answered = tokio::time::timeout(attempt, client.request(request)).await;
        if let Ok(Ok(response)) = answered
            && response.status().is_success()
        {
            let at = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            println!("{{\"ok\":true,\"attempts\":{attempts},\"answered_unix_us\":{at}}}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            println!("{{\"ok\":false,\"attempts\":{attempts}}}");
            return Ok(());
        }
        // A refused attempt returns at once: a millisecond apart, not a
        // spin.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
