//! `raw`: sends bytes that need not be valid HTTP and reports the status
//! line that comes back, to test how the proxy treats malformed input.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::opts::{Failure, Opts};

/// Most of a response head we read looking for the status line.
const MAX_READ: usize = 64 * 1024;

/// `--request` with `\r` and `\n` written as escapes; `--pad-header-bytes N`
/// adds one header of N bytes before the blank line (for 431 tests).
pub async fn run(opts: &Opts) -> Result<(), Failure> {
    opts.only(&["to", "request", "pad-header-bytes", "timeout-ms"])?;
    let to: SocketAddr = opts.get("to")?;
    let mut request = unescape(opts.raw("request").unwrap_or("GET / HTTP/1.1\\r\\n\\r\\n"));
    let pad: usize = opts.get_or("pad-header-bytes", 0)?;
    if pad > 0 {
        let head_end = request.rfind("\r\n\r\n").map_or(request.len(), |i| i + 2);
        request.insert_str(head_end, &format!("x-pad: {}\r\n", "a".repeat(pad)));
    }
    let timeout = Duration::from_millis(opts.get_or("timeout-ms", 2000)?);
    let line = tokio::time::timeout(timeout, exchange(to, request.as_bytes()))
        .await
        .unwrap_or_else(|_| Err("timeout".to_string()));
    let json = match line {
        Ok(line) => {
            let status = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse::<u16>().ok());
            serde_json::json!({"status_line": line, "status": status})
        }
        Err(error) => serde_json::json!({"status_line": null, "status": null, "error": error}),
    };
    println!("{json}");
    Ok(())
}

async fn exchange(to: SocketAddr, request: &[u8]) -> Result<String, String> {
    let mut stream = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
    // The server may answer and close before reading everything we send.
    let _ = stream.write_all(request).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while buf.len() < MAX_READ {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            return Ok(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
    }
    Err(format!("no status line in {} bytes", buf.len()))
}

fn unescape(text: &str) -> String {
    text.replace("\\r", "\r").replace("\\n", "\n")
}
