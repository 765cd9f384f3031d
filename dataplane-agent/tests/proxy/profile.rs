//! A fixed amount of HTTP/1.1 keep-alive work through the proxy, for
//! instruction counts (`docs/bench/profiling.md`): counted by callgrind at
//! two request counts, the difference divided by the extra requests is the
//! instructions one request costs the whole process (client, proxy and
//! backend), free of set-up; a change to the proxy moves it by the proxy's
//! share. Ignored: it measures, it does not check.

use crate::support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use support::{Backend, Mode, TestProxy, client, config};

#[tokio::test(flavor = "current_thread")]
#[ignore = "a measurement: run under valgrind --tool=callgrind (docs/bench/profiling.md)"]
async fn profile_keepalive_requests() {
    let requests: usize = std::env::var("DATAPLANE_PROFILE_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let backends = [
        Backend::start("b1", Mode::Ok).await,
        Backend::start("b2", Mode::Ok).await,
        Backend::start("b3", Mode::Ok).await,
    ];
    let proxy = TestProxy::start(&config(&backends.iter().collect::<Vec<_>>(), "")).await;
    let http = client(false);
    let uri: http::Uri = format!("http://{}/", proxy.addr).parse().unwrap();
    for _ in 0..requests {
        let response = http
            .request(
                Request::get(uri.clone())
                    .header("host", "echo")
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert!(response.status().is_success());
        response.into_body().collect().await.unwrap();
    }
}
