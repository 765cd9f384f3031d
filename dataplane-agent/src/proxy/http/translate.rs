//! The request as sent upstream, in the endpoint's HTTP version: HTTP/1.1
//! wants an origin-form target and a `Host` header, HTTP/2 an absolute URI
//! whose authority becomes `:authority`. The client's authority is kept
//! either way, so virtual hosts and gRPC servers see what the client asked
//! for; the connection goes to the endpoint whatever it says.

use std::net::SocketAddrV4;

use http::header::HOST;
use http::{HeaderValue, Request, Uri, Version};

use crate::config::UpstreamProtocol as Configured;
use crate::upstream::{Body, UpstreamProtocol};

/// The version to speak to the endpoints for a request that came in
/// `client`.
pub fn protocol_for(configured: Configured, client: Version) -> UpstreamProtocol {
    match configured {
        Configured::Http1 => UpstreamProtocol::Http1,
        Configured::Http2 => UpstreamProtocol::Http2,
        Configured::Auto if client == Version::HTTP_2 => UpstreamProtocol::Http2,
        Configured::Auto => UpstreamProtocol::Http1,
    }
}

/// Same method, headers and path; version, target and `Host` as
/// `protocol` wants them.
pub fn upstream_request(
    parts: &http::request::Parts,
    endpoint: SocketAddrV4,
    protocol: UpstreamProtocol,
    body: Body,
) -> Result<Request<Body>, http::Error> {
    let path_and_query = parts.uri.path_and_query();
    let path = path_and_query.map_or("/", |pq| pq.as_str());
    // Built only when needed: an HTTP/1.1 request with a Host has it.
    let authority = || {
        parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| Some(parts.headers.get(HOST)?.to_str().ok()?.to_string()))
            .unwrap_or_else(|| endpoint.to_string())
    };
    let mut headers = parts.headers.clone();
    let (version, uri) = match protocol {
        UpstreamProtocol::Http1 => {
            if !headers.contains_key(HOST)
                && let Ok(host) = HeaderValue::from_str(&authority())
            {
                headers.insert(HOST, host);
            }
            // Origin form; the parsed path is shared, not parsed again.
            let uri = match path_and_query {
                Some(pq) => {
                    let mut origin = http::uri::Parts::default();
                    origin.path_and_query = Some(pq.clone());
                    Uri::from_parts(origin)?
                }
                None => Uri::from_static("/"),
            };
            (Version::HTTP_11, uri)
        }
        UpstreamProtocol::Http2 => {
            // `:authority` carries it; RFC 9113 8.3.1 wants no disagreeing Host.
            headers.remove(HOST);
            let authority = authority();
            let uri = format!("http://{authority}{path}")
                .parse::<Uri>()
                .or_else(|_| format!("http://{endpoint}{path}").parse::<Uri>())?;
            (Version::HTTP_2, uri)
        }
    };
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::http::reply::full;

    fn parts(req: Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    const EP: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 0, 0, 1), 8080);

    #[test]
    fn h2_request_to_h1_endpoint_gets_origin_form_and_host_from_authority() {
        let p = parts(
            Request::builder()
                .version(Version::HTTP_2)
                .uri("http://echo.default:80/a?b=1")
                .body(())
                .unwrap(),
        );
        let r = upstream_request(&p, EP, UpstreamProtocol::Http1, full("")).unwrap();
        assert_eq!(r.version(), Version::HTTP_11);
        assert_eq!(r.uri(), "/a?b=1");
        assert_eq!(r.headers()[HOST], "echo.default:80");
    }

    #[test]
    fn h1_request_to_h2_endpoint_moves_host_to_authority() {
        let p = parts(
            Request::builder()
                .uri("/x")
                .header(HOST, "echo")
                .body(())
                .unwrap(),
        );
        let r = upstream_request(&p, EP, UpstreamProtocol::Http2, full("")).unwrap();
        assert_eq!(r.version(), Version::HTTP_2);
        assert_eq!(r.uri(), "http://echo/x");
        assert!(!r.headers().contains_key(HOST));
    }

    #[test]
    fn without_any_authority_the_endpoint_is_used() {
        let p = parts(Request::builder().uri("/").body(()).unwrap());
        let r = upstream_request(&p, EP, UpstreamProtocol::Http1, full("")).unwrap();
        assert_eq!(r.headers()[HOST], "10.0.0.1:8080");
    }

    #[test]
    fn auto_follows_the_client_and_fixed_protocols_do_not() {
        assert_eq!(
            protocol_for(Configured::Auto, Version::HTTP_2),
            UpstreamProtocol::Http2
        );
        assert_eq!(
            protocol_for(Configured::Auto, Version::HTTP_11),
            UpstreamProtocol::Http1
        );
        assert_eq!(
            protocol_for(Configured::Http1, Version::HTTP_2),
            UpstreamProtocol::Http1
        );
        assert_eq!(
            protocol_for(Configured::Http2, Version::HTTP_10),
            UpstreamProtocol::Http2
        );
    }
}
