//! The nftables rules of sidecar mode, in the pod's network namespace.
//!
//! Outbound: connections to the mesh services' VIP:ports are redirected to
//! the outbound listener (only those: the proxy's own connections go to
//! endpoint addresses and are never caught; marked sockets are skipped
//! too). Inbound: connections arriving for the application's ports are
//! redirected to the inbound listener. Rules live in one table, replaced
//! in one transaction on every change.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::config::MeshConfig;

const TABLE: &str = "dataplane_sidecar";

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("running nft (is the nftables package installed?): {0}")]
    Spawn(std::io::Error),
    #[error("nft rejected the rules: {0}")]
    Nft(String),
}

/// The sidecar's ports and the inbound ports to catch.
#[derive(Debug, Clone)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub admin: u16,
    /// Empty: every inbound port except the sidecar's own.
    pub inbound_only: Vec<u16>,
    pub mark: u32,
}

/// Installed rules; [`Redirect::remove`] takes them out.
pub struct Redirect {
    ports: Ports,
}

impl Redirect {
    pub fn install(cfg: &MeshConfig, ports: Ports) -> Result<Self, RedirectError> {
        let redirect = Self { ports };
        redirect.update(cfg)?;
        Ok(redirect)
    }

    /// Re-applies the rules for `cfg` (services may have changed).
    pub fn update(&self, cfg: &MeshConfig) -> Result<(), RedirectError> {
        nft(&ruleset(cfg, &self.ports))
    }

    pub fn remove(self) -> Result<(), RedirectError> {
        nft(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))
    }
}

/// The whole table; declaring it before deleting makes the delete valid
/// when it does not exist yet, so the replacement is one transaction.
pub fn ruleset(cfg: &MeshConfig, ports: &Ports) -> String {
    let mut rules = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    rules.push_str("  chain outbound {\n    type nat hook output priority -100; policy accept;\n");
    let _ = writeln!(rules, "    meta mark {:#x} return", ports.mark);
    let services: Vec<String> = cfg
        .services
        .iter()
        .map(|svc| format!("{} . {}", svc.vip.ip(), svc.vip.port()))
        .collect();
    if !services.is_empty() {
        let _ = writeln!(
            rules,
            "    ip daddr . tcp dport {{ {} }} redirect to :{}",
            services.join(", "),
            ports.outbound
        );
    }
    rules.push_str(
        "  }\n  chain inbound {\n    type nat hook prerouting priority -100; policy accept;\n",
    );
    let _ = if ports.inbound_only.is_empty() {
        writeln!(
            rules,
            "    tcp dport != {{ {}, {}, {} }} redirect to :{}",
            ports.outbound, ports.inbound, ports.admin, ports.inbound
        )
    } else {
        let list: Vec<String> = ports.inbound_only.iter().map(u16::to_string).collect();
        writeln!(
            rules,
            "    tcp dport {{ {} }} redirect to :{}",
            list.join(", "),
            ports.inbound
        )
    };
    rules.push_str("  }\n}\n");
    rules
}

fn nft(rules: &str) -> Result<(), RedirectError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RedirectError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(RedirectError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(RedirectError::Spawn)?;
    if !out.status.success() {
        return Err(RedirectError::Nft(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(inbound_only: Vec<u16>) -> Ports {
        Ports {
            outbound: 15001,
            inbound: 15006,
            admin: 15000,
            inbound_only,
            mark: 0x539,
        }
    }

    #[test]
    fn catches_service_vips_and_inbound_ports() {
        let cfg = MeshConfig::parse(
            "services:\n  - {name: a, vip: 198.19.0.10:80}\n  - {name: b, vip: 198.19.0.11:9000}\n",
            std::path::Path::new("t.yaml"),
        )
        .expect("config");
        let rules = ruleset(&cfg, &ports(vec![8080]));
        assert!(
            rules.contains(
                "ip daddr . tcp dport { 198.19.0.10 . 80, 198.19.0.11 . 9000 } redirect to :15001"
            ),
            "{rules}"
        );
        assert!(
            rules.contains("tcp dport { 8080 } redirect to :15006"),
            "{rules}"
        );
        assert!(rules.contains("meta mark 0x539 return"));
        assert!(
            rules.starts_with("table ip dataplane_sidecar\ndelete table ip dataplane_sidecar\n")
        );
    }

    #[test]
    fn without_services_or_port_list() {
        let rules = ruleset(&MeshConfig::default(), &ports(Vec::new()));
        assert!(!rules.contains("ip daddr"), "no empty set: {rules}");
        assert!(rules.contains("tcp dport != { 15001, 15006, 15000 } redirect to :15006"));
    }
}
