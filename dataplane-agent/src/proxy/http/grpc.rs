//! gRPC outcomes. A gRPC call answers HTTP 200 and puts its real result in
//! `grpc-status`: in the headers of a trailers-only response, or in the
//! trailers after the messages. Outlier detection, retries and metrics
//! must read that, or a backend failing every call with `UNAVAILABLE`
//! looks perfectly healthy.

use http::{HeaderMap, Response};

/// Whether the request is a gRPC call (`content-type: application/grpc*`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            // Not gRPC-web: its status travels in the body, not in trailers.
            v.strip_prefix("application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
        })
}

/// `grpc-status` of a header or trailer block, if present and valid.
pub fn status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The HTTP status a gRPC status stands for, as Envoy maps them for
/// outlier detection and stats (`Grpc::Utility::grpcToHttpStatus`), so the
/// HTTP detectors judge gRPC endpoints the same way: UNAVAILABLE is a 503
/// gateway error, INTERNAL and UNKNOWN are 500s, client-side codes are 4xx.
pub fn http_equivalent(code: u32) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        2 => 500,
        3 => 400,
        4 => 504,
        5 => 404,
        6 => 409,
        7 => 403,
        8 => 429,
        9 => 400,
        10 => 409,
        11 => 400,
        12 => 501,
        13 => 500,
        14 => 503,
        15 => 500,
        16 => 401,
        _ => 500,
    }
}

/// When a response's verdict on its endpoint is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// From the response head: its HTTP status, or the gRPC status of a
    /// trailers-only response mapped to HTTP.
    Now { status: u16, grpc: Option<u32> },
    /// A gRPC response with its status still to come in the trailers.
    AtTrailers,
}

/// The verdict a response head gives.
pub fn verdict<B>(request_is_grpc: bool, response: &Response<B>) -> Verdict {
    let status = response.status().as_u16();
    if !request_is_grpc || status != 200 {
        return Verdict::Now { status, grpc: None };
    }
    match self::status(response.headers()) {
        Some(code) => Verdict::Now {
            status: http_equivalent(code),
            grpc: Some(code),
        },
        None => Verdict::AtTrailers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, grpc: Option<&str>) -> Response<()> {
        let mut r = Response::builder().status(status);
        if let Some(code) = grpc {
            r = r.header("grpc-status", code);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn grpc_web_is_not_grpc() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(http::header::CONTENT_TYPE, v.parse().unwrap());
            m
        };
        assert!(is_grpc(&h("application/grpc")));
        assert!(is_grpc(&h("application/grpc+proto")));
        assert!(!is_grpc(&h("application/grpc-web+proto")));
        assert!(!is_grpc(&h("application/json")));
    }

    #[test]
    fn unavailable_is_a_gateway_error_and_ok_is_success() {
        assert_eq!(http_equivalent(14), 503);
        assert_eq!(http_equivalent(0), 200);
        assert_eq!(http_equivalent(13), 500);
        assert_eq!(http_equivalent(99), 500, "unknown codes count as UNKNOWN");
    }

    #[test]
    fn trailers_only_responses_are_judged_at_once() {
        assert_eq!(
            verdict(true, &response(200, Some("14"))),
            Verdict::Now {
                status: 503,
                grpc: Some(14)
            }
        );
        assert_eq!(verdict(true, &response(200, None)), Verdict::AtTrailers);
    }

    #[test]
    fn plain_http_and_http_errors_are_judged_by_their_status() {
        assert_eq!(
            verdict(false, &response(200, Some("14"))),
            Verdict::Now {
                status: 200,
                grpc: None
            }
        );
        assert_eq!(
            verdict(true, &response(503, None)),
            Verdict::Now {
                status: 503,
                grpc: None
            }
        );
    }
}
