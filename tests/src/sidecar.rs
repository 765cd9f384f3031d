//! Running the proxy in sidecar mode inside a simulated pod: its config,
//! readiness and metrics through the pod's own loopback, and a graceful
//! stop that removes its nftables rules.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::agent::{Metrics, http_get_in_netns};
use crate::{Pod, Proc, SimNode, binaries, eventually};

/// The sidecar's admin endpoint, on the pod's loopback.
pub const SIDECAR_ADMIN: &str = "127.0.0.1:15000";

/// `dataplane-agent sidecar --redirect` in one pod.
pub struct Sidecar {
    proc: Option<Proc>,
    netns: String,
    work_dir: PathBuf,
}

impl Sidecar {
    /// Starts the sidecar of `pod` with `config_yaml`, catching inbound
    /// connections to `inbound_ports`; waits until it is ready.
    pub fn start(
        node: &SimNode,
        pod: &Pod,
        config_yaml: &str,
        inbound_ports: &[u16],
    ) -> anyhow::Result<Sidecar> {
        let work_dir = std::env::temp_dir().join(format!("dataplane-{}-{}", node.id(), pod.name));
        std::fs::create_dir_all(&work_dir)?;
        let config = work_dir.join("mesh.yaml");
        std::fs::write(&config, config_yaml)?;
        let log = std::fs::File::create(work_dir.join("sidecar.log"))?;
        let ports: Vec<String> = inbound_ports.iter().map(u16::to_string).collect();
        let mut cmd = Command::new(binaries::agent()?);
        cmd.args([
            "sidecar",
            "--redirect",
            &format!("--config={}", config.display()),
        ])
        .arg(format!("--inbound-ports={}", ports.join(",")))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
        let mut sidecar = Sidecar {
            proc: Some(node.spawn_in_pod(pod, cmd)?),
            netns: pod.netns.clone(),
            work_dir,
        };
        sidecar.wait_ready()?;
        Ok(sidecar)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let result = eventually("sidecar ready", Duration::from_secs(10), || {
            if let Some(status) = self.proc.as_mut().and_then(|p| p.try_wait().ok().flatten()) {
                bail!("sidecar exited with {status}");
            }
            let body = http_get_in_netns(&self.netns, SIDECAR_ADMIN.parse()?, "/ready")?;
            anyhow::ensure!(body.trim() == "ready", "not ready: {body}");
            Ok(())
        });
        result.with_context(|| format!("sidecar log:\n{}", self.log()))
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.work_dir.join("sidecar.log")).unwrap_or_default()
    }

    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        Ok(Metrics::parse(&http_get_in_netns(
            &self.netns,
            SIDECAR_ADMIN.parse()?,
            "/metrics",
        )?))
    }

    /// SIGTERM, as Kubernetes stops a container; the sidecar removes its
    /// rules and exits.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut proc) = self.proc.take() else {
            bail!("sidecar already stopped");
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(proc.pid() as libc::pid_t, libc::SIGTERM) };
        proc.wait_timeout(Duration::from_secs(5))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            let _ = proc.kill();
        }
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}
