//! `httptool grpc`: one gRPC-shaped call over HTTP/2 prior knowledge, to
//! check that trailers (where gRPC puts its status) survive the proxy.

use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use http::{HeaderMap, Method};
use serde::Serialize;

use crate::client::{self, Template};
use crate::opts::{Failure, Opts};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The message sent; its content does not matter, the test backend echoes.
const MESSAGE: &[u8] = b"httptool";

/// The JSON line `grpc` prints. `status` is null when no response came,
/// and then `error` holds the failure class.
#[derive(Serialize, Default)]
struct GrpcLine {
    status: Option<u16>,
    grpc_status: Option<String>,
    grpc_message: Option<String>,
    trailers: bool,
    backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

pub async fn run(opts: &Opts) -> Result<(), Failure> {
    opts.only(&["url", "header", "timeout-ms"])?;
    let timeout = Duration::from_millis(opts.get_or("timeout-ms", 2000)?.max(1));
    let template = Template::from_opts(opts, Method::POST, frame(MESSAGE))?
        .with_header("content-type", "application/grpc")
        .with_header("te", "trailers");
    let client = client::client(true, true, 1, timeout.max(DEFAULT_TIMEOUT));
    let line = match client::exchange(&client, &template, timeout).await {
        Ok(exchanged) => {
            let headers = &exchanged.head.headers;
            let trailers = exchanged.trailers.as_ref();
            // A trailers-only response carries grpc-status in the headers.
            let grpc = |name| {
                trailers
                    .and_then(|t| text(t, name))
                    .or_else(|| text(headers, name))
            };
            GrpcLine {
                status: Some(exchanged.head.status.as_u16()),
                grpc_status: grpc("grpc-status"),
                grpc_message: grpc("grpc-message"),
                trailers: trailers.is_some(),
                backend: text(headers, "x-backend"),
                error: None,
            }
        }
        Err(kind) => GrpcLine {
            error: Some(kind),
            ..GrpcLine::default()
        },
    };
    let json = serde_json::to_string(&line).map_err(|e| Failure::Run(e.to_string()))?;
    println!("{json}");
    Ok(())
}

/// A gRPC length-prefixed message: flag 0 (uncompressed), u32 length.
fn frame(message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + message.len());
    buf.put_u8(0);
    buf.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    buf.put_slice(message);
    buf.freeze()
}

fn text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}
