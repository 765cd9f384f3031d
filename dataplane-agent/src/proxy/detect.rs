//! Protocol detection for services with `protocol: auto`: peek at the
//! first bytes of the connection without consuming them.

use std::time::Duration;

use tokio::net::TcpStream;

/// What the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    /// HTTP/2 with prior knowledge (h2c): the connection preface.
    Http2,
    /// Anything else.
    Opaque,
    /// Nothing arrived in time: a client waiting for a server-first
    /// protocol's greeting, or an HTTP client's connection opened ahead of
    /// use. Not decided yet (see `tcp::serve_silent`).
    Silent,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
/// While the first bytes are still ambiguous, how long to wait between peeks.
const PEEK_RETRY: Duration = Duration::from_millis(1);

/// Classifies a connection from the bytes received so far; `None` means
/// they are a prefix of something recognisable and more are needed.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.is_empty() {
        return None;
    }
    let is_prefix = |pattern: &[u8]| {
        let n = bytes.len().min(pattern.len());
        bytes[..n] == pattern[..n]
    };
    if is_prefix(H2_PREFACE) {
        return (bytes.len() >= H2_PREFACE.len()).then_some(Detected::Http2);
    }
    let mut undecided = false;
    for method in METHODS {
        if bytes.starts_with(method) {
            return Some(Detected::Http1);
        }
        undecided |= is_prefix(method);
    }
    if undecided {
        None
    } else {
        Some(Detected::Opaque)
    }
}

/// Peeks until the protocol is known or `timeout` passes: then `Silent`
/// if nothing arrived, `Opaque` if the bytes so far are still ambiguous.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut last_len = usize::MAX;
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(result) => result?,
            Err(_) if last_len == usize::MAX => return Ok(Detected::Silent),
            Err(_) => return Ok(Detected::Opaque),
        };
        if peeked == 0 {
            // The client closed without sending: nothing to detect.
            return Ok(Detected::Opaque);
        }
        if let Some(found) = classify(&buf[..peeked]) {
            return Ok(found);
        }
        if peeked == last_len {
            // peek() returns at once while data is queued: wait for more.
            if tokio::time::Instant::now() >= deadline {
                return Ok(Detected::Opaque);
            }
            tokio::time::sleep(PEEK_RETRY).await;
        }
        last_len = peeked;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_http1_request_lines() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None, "a prefix needs more bytes");
        assert_eq!(classify(b"GET"), None);
    }

    #[test]
    fn recognises_the_h2_preface_only_when_complete() {
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        // "P" could also start POST/PUT/PATCH.
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"POST /x"), Some(Detected::Http1));
    }

    #[test]
    fn anything_else_is_opaque() {
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Opaque), "TLS");
        assert_eq!(
            classify(b"get / HTTP/1.1"),
            Some(Detected::Opaque),
            "methods are case-sensitive"
        );
        assert_eq!(classify(b"GETX"), Some(Detected::Opaque));
        assert_eq!(classify(b""), None);
    }
}

#[cfg(test)]
mod silence {
    use super::*;

    #[tokio::test]
    async fn silence_is_not_decided_but_a_stalled_prefix_is_opaque() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let wait = Duration::from_millis(20);
        assert_eq!(detect(&server, wait).await.unwrap(), Detected::Silent);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GE")
            .await
            .unwrap();
        assert_eq!(detect(&server, wait).await.unwrap(), Detected::Opaque);
    }
}
