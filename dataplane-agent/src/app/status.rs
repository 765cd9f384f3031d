//! `dataplane-agent status`: the running agent's `/clusters`, as a table
//! an operator reads in one look (or the JSON with `--json`).

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::admin::{Clusters, EndpointStatus};

/// How long the agent may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read (a node with thousands of endpoints fits).
const MAX_ANSWER: u64 = 64 * 1024 * 1024;

/// Fetches `/clusters` from the agent's admin endpoint at `admin`.
pub fn fetch(admin: SocketAddr) -> anyhow::Result<String> {
    let context =
        || format!("asking the agent at {admin} (its --admin-addr) for /clusters; is it running?");
    let mut stream = TcpStream::connect_timeout(&admin, TIMEOUT).with_context(context)?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .with_context(context)?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .with_context(context)?;
    write!(stream, "GET /clusters HTTP/1.0\r\nHost: {admin}\r\n\r\n").with_context(context)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .with_context(context)?;
    let answer = String::from_utf8(answer).context("the agent's answer is not UTF-8")?;
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        bail!("the agent at {admin} sent no HTTP answer");
    };
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("the agent at {admin} answered {status:?} to /clusters (an older agent?)");
    }
    Ok(body.to_string())
}

/// The table `status` prints.
pub fn render(clusters: &Clusters) -> String {
    let mut out = String::new();
    for service in &clusters.services {
        let _ = writeln!(
            out,
            "{}  {}  {}{}",
            service.service,
            service.vip,
            service.protocol,
            if service.outlier_detection {
                ""
            } else {
                "  (outlier detection off)"
            }
        );
        let rows: Vec<[String; 6]> = service.endpoints.iter().map(endpoint_row).collect();
        let header = [
            "ENDPOINT", "HEALTH", "DETAIL", "ACTIVE", "WEIGHT", "LOCALITY",
        ]
        .map(str::to_string);
        let mut widths = header.clone().map(|h| h.len());
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        for row in std::iter::once(&header).chain(&rows) {
            let mut line = String::from("  ");
            for (cell, width) in row.iter().zip(widths) {
                let _ = write!(line, "{cell:<width$}  ");
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        let breakers: Vec<String> = service
            .circuit_breakers
            .iter()
            .filter(|b| b.in_use > 0 || b.max != u32::MAX)
            .map(|b| format!("{} {}/{}", b.limit, b.in_use, b.max))
            .collect();
        if !breakers.is_empty() {
            let _ = writeln!(out, "  circuit breakers: {}", breakers.join(", "));
        }
        out.push('\n');
    }
    if clusters.services.is_empty() {
        out.push_str("no services\n");
    }
    out
}

fn endpoint_row(ep: &EndpointStatus) -> [String; 6] {
    let detail = match ep.health.as_str() {
        "ejected" => format!(
            "{:.1}s left, ejection #{}",
            ep.ejected_for_ms.unwrap_or(0) as f64 / 1000.0,
            ep.ejections.unwrap_or(0)
        ),
        "half_open" => format!(
            "{} probe(s) in flight, {} ok",
            ep.probes_in_flight.unwrap_or(0),
            ep.probe_successes.unwrap_or(0)
        ),
        _ => String::new(),
    };
    let locality = match (ep.region.as_str(), ep.zone.as_str()) {
        ("", "") => String::new(),
        (region, zone) => format!("{region}/{zone}"),
    };
    [
        ep.address.clone(),
        ep.health.clone(),
        detail,
        ep.active.to_string(),
        ep.weight.to_string(),
        locality,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{BreakerStatus, ServiceStatus};

    fn endpoint(address: &str, health: &str) -> EndpointStatus {
        EndpointStatus {
            address: address.into(),
            weight: 1,
            region: String::new(),
            zone: String::new(),
            health: health.into(),
            ejected_for_ms: None,
            ejections: None,
            probes_in_flight: None,
            probe_successes: None,
            active: 0,
        }
    }

    #[test]
    fn the_table_says_why_an_endpoint_gets_no_traffic() {
        let mut ejected = endpoint("10.0.0.2:8080", "ejected");
        ejected.ejected_for_ms = Some(28_100);
        ejected.ejections = Some(2);
        let mut probing = endpoint("10.0.0.3:8080", "half_open");
        probing.probes_in_flight = Some(1);
        probing.region = "r1".into();
        probing.zone = "a".into();
        let clusters = Clusters {
            services: vec![ServiceStatus {
                service: "default/echo".into(),
                vip: "198.19.0.10:80".into(),
                protocol: "http".into(),
                outlier_detection: true,
                circuit_breakers: vec![
                    BreakerStatus {
                        limit: "max_requests".into(),
                        in_use: 3,
                        max: 100,
                    },
                    BreakerStatus {
                        limit: "max_retries".into(),
                        in_use: 0,
                        max: u32::MAX,
                    },
                ],
                endpoints: vec![endpoint("10.0.0.1:8080", "healthy"), ejected, probing],
            }],
        };
        let table = render(&clusters);
        let expected = "\
default/echo  198.19.0.10:80  http
  ENDPOINT       HEALTH     DETAIL                      ACTIVE  WEIGHT  LOCALITY
  10.0.0.1:8080  healthy                                0       1
  10.0.0.2:8080  ejected    28.1s left, ejection #2     0       1
  10.0.0.3:8080  half_open  1 probe(s) in flight, 0 ok  0       1       r1/a
  circuit breakers: max_requests 3/100

";
        assert_eq!(table, expected, "\n{table}");
    }
}
