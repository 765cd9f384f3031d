//! Sidecar mode: the same proxy, one per pod, inside the pod's network
//! namespace, with traffic caught by nftables REDIRECT as Istio's sidecar
//! does: outbound connections to mesh services go to the outbound listener,
//! inbound connections to the inbound listener, which hands them to the
//! application on loopback. Both listeners learn the original destination
//! with `SO_ORIGINAL_DST`, answered by conntrack here (by the capture
//! programs in node mode), so one proxy code path serves both modes.
//!
//! It exists to be measured against node mode on the same work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::runtime::{self, Runtime, raise_fd_limit};
use crate::sidecar::redirect::{Ports, Redirect};
use crate::state::NodeContext;

#[derive(Debug, Clone)]
pub struct Settings {
    pub config: PathBuf,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Install the nftables rules (and remove them on exit).
    pub redirect: bool,
    /// Inbound ports to catch; empty: every port but the sidecar's own.
    pub inbound_ports: Vec<u16>,
    pub node: NodeContext,
    pub resync: Duration,
    /// How long a stopping sidecar waits for connections to finish.
    pub drain_timeout: Duration,
    /// Log every HTTP request.
    pub access_log: bool,
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let loaded = runtime::load_config(&settings.config)?;
    raise_fd_limit();
    let outbound = runtime::bind_proxy(settings.outbound_addr, "--outbound-addr").await?;
    let inbound = runtime::bind_proxy(settings.inbound_addr, "--inbound-addr").await?;
    let admin_listener = runtime::bind(settings.admin_addr, "--admin-addr").await?;
    let mut rt = Runtime::start(loaded, settings.node.clone(), admin_listener, |_| {});

    let ports = Ports {
        outbound: settings.outbound_addr.port(),
        inbound: settings.inbound_addr.port(),
        admin: settings.admin_addr.port(),
        inbound_only: settings.inbound_ports.clone(),
        mark: settings.node.mark,
    };
    let redirect = if settings.redirect {
        Some(Redirect::install(&rt.config, ports)?)
    } else {
        None
    };
    tokio::spawn(Arc::clone(&rt.proxy).serve(outbound));
    tokio::spawn(Arc::clone(&rt.proxy).serve_inbound(inbound));
    rt.proxy
        .access_log
        .store(settings.access_log, std::sync::atomic::Ordering::Relaxed);
    rt.set_ready();
    info!(outbound = %settings.outbound_addr, inbound = %settings.inbound_addr, "sidecar ready");

    rt.run_until_shutdown(settings.resync, |config, reloaded| {
        if reloaded
            && let Some(redirect) = &redirect
            && let Err(err) = redirect.update(config)
        {
            warn!(%err, "nftables rules not updated");
        }
    })
    .await;
    rt.drain(settings.drain_timeout).await;
    if let Some(redirect) = redirect {
        redirect.remove()?;
    }
    info!("sidecar stopped");
    Ok(())
}
