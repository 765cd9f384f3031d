//! `run --publish`: the mesh's own services (those of the config file) are
//! written into the registry, so that applications outside the mesh that
//! look services up there (an SDK client) find them. Every key is written
//! under this agent's lease: when the agent stops or dies, what it wrote
//! goes with the lease, and what another agent of the mesh publishes too
//! is written again by that agent within one period.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use tokio::sync::watch;
use tracing::{info, warn};

use super::client;
use super::layout::{InstanceRecord, ServiceId, ServiceRecord, instance_key, service_key};
use crate::config::{MeshConfig, Service};

/// How often what should be in the registry is compared with what is.
const PERIOD: Duration = Duration::from_secs(3);
/// The publisher's lease: what it wrote outlives it by at most this.
const TTL: i64 = 10;

/// The keys and values `services` are published as.
pub fn records<S: std::borrow::Borrow<Service>>(
    prefix: &str,
    services: &[S],
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for svc in services {
        let svc: &Service = svc.borrow();
        let id = ServiceId {
            tenant: svc.namespace.clone(),
            name: svc.name.clone(),
        };
        let record = ServiceRecord {
            vip: svc.vip,
            protocol: svc.protocol,
            upstream_protocol: svc.upstream_protocol,
            traffic_policy: svc.traffic_policy.clone(),
        };
        if let Ok(value) = serde_json::to_string(&record) {
            out.insert(service_key(prefix, &id), value);
        }
        for ep in &svc.endpoints {
            let instance = InstanceRecord {
                address: ep.address,
                weight: ep.weight,
                region: ep.region.clone(),
                zone: ep.zone.clone(),
                metadata: BTreeMap::new(),
            };
            let key = instance_key(prefix, &id, &ep.address.to_string().replace(':', "-"));
            if let Ok(value) = serde_json::to_string(&instance) {
                out.insert(key, value);
            }
        }
    }
    out
}

/// Publishes the config file's services from `files` (the latest file
/// config) until the process ends.
pub fn start(access: client::Access, prefix: String, files: watch::Receiver<MeshConfig>) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            let err = publish(&access, &prefix, files.clone()).await;
            warn!(error = %err, retry_in = ?backoff, "registry: publishing interrupted");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

/// One session: a lease, kept alive, and the keys kept equal to the
/// config under it. Returns why it ended.
async fn publish(
    access: &client::Access,
    prefix: &str,
    files: watch::Receiver<MeshConfig>,
) -> String {
    let mut client = match client::connect(access).await {
        Ok(client) => client,
        Err(err) => return err,
    };
    let lease = match client::timed("granting a lease", client.lease_grant(TTL, None)).await {
        Ok(granted) => granted.id(),
        Err(err) => return err,
    };
    // The lease is kept alive beside the writes, never behind them: a slow
    // write must not let it expire.
    tokio::select! {
        err = keep_alive(client.clone(), lease) => err,
        err = keep_published(client, prefix, lease, files) => err,
    }
}

async fn keep_alive(mut client: Client, lease: i64) -> String {
    let (mut keeper, mut acks) = match client::timed(
        "opening the lease keep-alive",
        client.lease_keep_alive(lease),
    )
    .await
    {
        Ok(stream) => stream,
        Err(err) => return err,
    };
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tick.tick().await;
        if let Err(err) = client::timed("keep-alive", keeper.keep_alive()).await {
            return err;
        }
        match client::timed("keep-alive answer", acks.message()).await {
            Ok(Some(ack)) if ack.ttl() > 0 => {}
            Ok(Some(_)) => return format!("lease {lease:x} expired"),
            Ok(None) => return "the keep-alive stream ended".into(),
            Err(err) => return err,
        }
    }
}

/// Keeps the keys of the config's services equal to what they should be,
/// reading only the prefixes of the tenants this agent publishes.
async fn keep_published(
    mut client: Client,
    prefix: &str,
    lease: i64,
    mut files: watch::Receiver<MeshConfig>,
) -> String {
    let mut written: BTreeMap<String, String> = BTreeMap::new();
    // The first pass writes every key: keys an earlier session left under
    // its own lease (still alive for a while) move to this one, instead of
    // vanishing when that lease expires.
    let mut first_pass = true;
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = files.changed() => if changed.is_err() { return "stopping".into() },
        }
        let services = files.borrow().services.clone();
        let want = records(prefix, &services);
        let tenants: BTreeSet<&str> = services.iter().map(|s| s.namespace.as_str()).collect();
        let mut current = BTreeMap::new();
        for tenant in tenants {
            for kind in ["services", "instances"] {
                let under = format!("{prefix}/{kind}/{tenant}/");
                let listing = client::timed(
                    &format!("reading {under}"),
                    client.get(under.as_str(), Some(GetOptions::new().with_prefix())),
                )
                .await;
                let listing = match listing {
                    Ok(listing) => listing,
                    Err(err) => return err,
                };
                current.extend(listing.kvs().iter().map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    )
                }));
            }
        }
        // What another agent's lease took away is written again.
        for (key, value) in &want {
            if first_pass || current.get(key) != Some(value) {
                let put = client.put(
                    key.as_str(),
                    value.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                );
                if let Err(err) = client::timed(&format!("writing {key}"), put).await {
                    return err;
                }
            }
        }
        for key in written.keys().filter(|k| !want.contains_key(*k)) {
            if let Err(err) = client::timed(
                &format!("deleting {key}"),
                client.delete(key.as_str(), None),
            )
            .await
            {
                return err;
            }
        }
        if written != want {
            info!(keys = want.len(), "registry: published the mesh's services");
        }
        written = want;
        first_pass = false;
    }
}
