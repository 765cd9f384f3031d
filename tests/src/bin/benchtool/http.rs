//! `http-rr`: HTTP/1.1 keep-alive requests, one hyper `SendRequest` per
//! connection (no pool: the driver decides which connection sends), the
//! response body read in full. A non-2xx status is an error.

use std::error::Error as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::driver::{Connector, Exchange, Failed};
use crate::opts::{Failure, Opts};
use crate::rr;

const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

pub async fn run(opts: &Opts) -> Result<(), Failure> {
    opts.only(&[rr::OPTIONS, &["url", "body-bytes"]].concat())?;
    let url = opts
        .raw("url")
        .ok_or_else(|| Failure::Usage("--url is required".into()))?;
    let body_bytes = opts.bounded_or("body-bytes", 0, 0..=MAX_BODY_BYTES)?;
    let connector = connector(url, body_bytes)?;
    let plan = rr::plan(opts)?;
    rr::run("http-rr", url, connector, &plan).await
}

/// A connector for `url` (see [`Target::parse`]), for the other
/// subcommands that speak HTTP (`burst`).
pub fn connector(url: &str, body_bytes: usize) -> Result<HttpRr, Failure> {
    let (addr, target) = Target::parse(url, body_bytes)?;
    Ok(HttpRr {
        addr,
        target: Arc::new(target),
    })
}

/// The request every exchange sends.
struct Target {
    method: Method,
    /// Origin form (`/path?query`), as HTTP/1.1 sends it.
    path: Uri,
    host: HeaderValue,
    body: Bytes,
}

impl Target {
    /// `http://<ip>[:port]/path`: the host must be an address, since a
    /// benchmark must not depend on (or leak queries to) DNS. A body
    /// makes it a POST.
    fn parse(url: &str, body_bytes: usize) -> Result<(SocketAddr, Target), Failure> {
        let bad = |why: &str| Failure::Usage(format!("--url {url:?}: {why}"));
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// is supported"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let ip: IpAddr = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| bad("the host must be an IP address"))?;
        let addr = SocketAddr::new(ip, authority.port_u16().unwrap_or(80));
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let target = Target {
            method: if body_bytes > 0 {
                Method::POST
            } else {
                Method::GET
            },
            path: path.parse().map_err(|_| bad("bad path"))?,
            host: HeaderValue::from_str(authority.as_str()).map_err(|_| bad("bad host"))?,
            body: Bytes::from(vec![b'x'; body_bytes]),
        };
        Ok((addr, target))
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.path.clone();
        req.headers_mut().insert(HOST, self.host.clone());
        req
    }
}

pub struct HttpRr {
    addr: SocketAddr,
    target: Arc<Target>,
}

impl Connector for HttpRr {
    type Conn = HttpConn;

    async fn connect(&self) -> io::Result<HttpConn> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        // Drives the connection; ends when it closes or `sender` is dropped.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(HttpConn {
            sender,
            target: self.target.clone(),
        })
    }
}

pub struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    target: Arc<Target>,
}

impl Exchange for HttpConn {
    async fn exchange(&mut self) -> Result<(), Failed> {
        let broken = |e: hyper::Error| Failed {
            kind: hyper_kind(&e),
            broken: true,
        };
        self.sender.ready().await.map_err(broken)?;
        let response = self
            .sender
            .send_request(self.target.request())
            .await
            .map_err(broken)?;
        let success = response.status().is_success();
        // Read the whole body even on error, to keep the connection usable.
        response.into_body().collect().await.map_err(broken)?;
        match success {
            true => Ok(()),
            false => Err(Failed {
                kind: "status",
                broken: false,
            }),
        }
    }

    fn usable(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// The socket error under hyper's, else `closed` for a connection that
/// ended before a complete response, else `http`.
fn hyper_kind(err: &hyper::Error) -> &'static str {
    let mut cause = err.source();
    while let Some(inner) = cause {
        if let Some(io) = inner.downcast_ref::<io::Error>() {
            return rr::io_kind(io);
        }
        cause = inner.source();
    }
    if err.is_incomplete_message() || err.is_closed() || err.is_canceled() {
        return "closed";
    }
    "http"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_name_an_address() {
        let parsed = Target::parse("http://198.18.0.10:8080/x?y=1", 0).ok();
        let (addr, target) = parsed.unzip();
        assert_eq!(addr, "198.18.0.10:8080".parse().ok());
        let target = target.map(|t| (t.method, t.path.to_string(), t.host));
        assert_eq!(
            target,
            Some((
                Method::GET,
                "/x?y=1".into(),
                HeaderValue::from_static("198.18.0.10:8080")
            ))
        );
        let post = Target::parse("http://[::1]/", 10).ok();
        assert_eq!(post.as_ref().map(|(a, _)| a.port()), Some(80));
        assert_eq!(post.map(|(_, t)| t.method), Some(Method::POST));
        assert!(Target::parse("http://example.com/", 0).is_err());
        assert!(Target::parse("https://127.0.0.1/", 0).is_err());
    }
}
