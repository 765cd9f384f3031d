//! `dataplane-agent register`: keeps one instance registered under a lease
//! until the process is stopped. A graceful stop deletes the instance and
//! revokes the lease; a crash stops the keep-alives and etcd
//! deletes the instance when the lease expires (its TTL later).

use std::time::Duration;

use anyhow::{Context as _, bail};
use etcd_client::PutOptions;
use tracing::{info, warn};

use super::client;
use super::layout::{InstanceRecord, ServiceId, instance_key, valid_segment};

/// What to register, and where.
#[derive(Debug, Clone)]
pub struct Registration {
    pub access: client::Access,
    pub prefix: String,
    pub service: ServiceId,
    pub id: String,
    pub instance: InstanceRecord,
    /// The lease's time to live: how long a crashed instance stays listed.
    pub ttl: Duration,
}

/// Registers, keeps the lease alive until `stop` completes, then revokes
/// it. Errors name what failed.
pub async fn run(
    reg: Registration,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    for (what, value) in [
        ("--tenant", reg.service.tenant.as_str()),
        ("--service", &reg.service.name),
        ("--id", &reg.id),
    ] {
        if !valid_segment(value) {
            bail!("{what} {value:?}: must be one non-empty path segment (no '/')");
        }
    }
    let ttl = i64::try_from(reg.ttl.as_secs()).unwrap_or(i64::MAX);
    if ttl < 2 {
        bail!("--ttl: at least 2s (keep-alives go every third of it)");
    }
    let mut client = client::connect(&reg.access)
        .await
        .map_err(anyhow::Error::msg)?;
    let lease = client::timed("granting a lease", client.lease_grant(ttl, None))
        .await
        .map_err(anyhow::Error::msg)?
        .id();
    let key = instance_key(&reg.prefix, &reg.service, &reg.id);
    let value = serde_json::to_string(&reg.instance).context("encoding the instance")?;
    client::timed(
        &format!("writing {key} (may this etcd user write under it?)"),
        client.put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        ),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    info!(%key, lease, ttl_s = ttl, "registered");
    println!("registered {key} (lease {lease:x}, ttl {ttl}s)");

    let period = reg.ttl / 3;
    let mut renewer = client.clone();
    let keep_alive = async {
        let mut tick = tokio::time::interval(period);
        let mut stream = None;
        loop {
            tick.tick().await;
            // A keep-alive stream that failed (its member died) is opened
            // again, on a member that answers: the lease survives as long
            // as one does within the TTL.
            if stream.is_none() {
                let opened = client::timed(
                    "opening a lease keep-alive",
                    renewer.lease_keep_alive(lease),
                );
                match opened.await {
                    Ok(opened) => stream = Some(opened),
                    Err(err) => {
                        warn!(%err, "lease keep-alive stream not opened");
                        continue;
                    }
                }
            }
            let Some((keeper, responses)) = stream.as_mut() else {
                continue;
            };
            let answer = match tokio::time::timeout(period, keeper.keep_alive())
                .await
                .unwrap_or(Ok(()))
            {
                Ok(()) => tokio::time::timeout(period, responses.message())
                    .await
                    .unwrap_or_else(|_| Ok(None)),
                Err(err) => Err(err),
            };
            match answer {
                Ok(Some(answer)) if answer.ttl() <= 0 => {
                    return format!("lease {lease:x} expired");
                }
                Ok(Some(_)) => {}
                Ok(None) => stream = None,
                Err(err) => {
                    warn!(%err, "lease keep-alive failed");
                    stream = None;
                }
            }
        }
    };
    tokio::select! {
        reason = keep_alive => bail!("{key}: {reason}; the instance is no longer registered"),
        () = stop => {}
    }
    // The key first, then the lease: a delete needs only the write
    // permission the registrant has anyway, while etcd 3.4 refuses some
    // authenticated lease revocations ("user name is empty"); the lease,
    // if it survives, expires with nothing attached.
    // With etcd authentication the token may have expired while only
    // keep-alives were sent: a fresh one first (no-op without a user).
    if let Err(err) = client::timed("refreshing the auth token", client.refresh_token()).await {
        warn!(%err, "deregistering with the old token");
    }
    client::timed(
        &format!("deleting {key} (it stays until its lease expires)"),
        client.delete(key.as_str(), None),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    if let Err(err) = client::timed("revoking the lease", client.lease_revoke(lease)).await {
        warn!(%err, "the lease expires on its own");
    }
    info!(%key, "deregistered");
    println!("deregistered {key}");
    Ok(())
}
