//! The access log (`--access-log`): one line per HTTP request with the
//! caller, the request, the status and the proxy's failure reason, and
//! nothing when it is off. Its own test binary: it installs the process's
//! log subscriber and reads what is written.

use crate::support;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use support::{Backend, Mode, TestProxy, bounded, client, config, get_with};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn access_lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains("access:"))
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test]
async fn each_http_request_is_logged_with_its_failure_reason() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("access=info")
        .init();
    bounded(async {
        let ok = Backend::start("ok", Mode::Ok).await;
        let bad = Backend::start("bad", Mode::Status(503)).await;
        let proxy = TestProxy::start(&config(
            &[&ok],
            "    trafficPolicy:\n      retries: {attempts: 0}\n",
        ))
        .await;
        get_with(&client(false), &proxy, &[]).await;
        assert!(captured.access_lines().is_empty(), "off by default");

        proxy.proxy.access_log.store(true, Ordering::Relaxed);
        get_with(&client(false), &proxy, &[]).await;
        let lines = captured.access_lines();
        let [line] = &lines[..] else {
            panic!("one line per request: {lines:?}");
        };
        for field in [
            "service=default/echo",
            "method=GET",
            "path=/",
            "status=200",
            "upstream_ms=",
        ] {
            assert!(line.contains(field), "{field} in {line}");
        }

        // A failure the proxy answers: its reason is in the line.
        let failing = TestProxy::start(&config(
            &[&bad],
            "    trafficPolicy:\n      retries: {attempts: 1}\n",
        ))
        .await;
        failing.proxy.access_log.store(true, Ordering::Relaxed);
        get_with(&client(false), &failing, &[]).await;
        let lines = captured.access_lines();
        let last = lines.last().unwrap();
        assert!(
            last.contains("status=503") && last.contains("retries_exhausted"),
            "{last}"
        );
    })
    .await;
}
