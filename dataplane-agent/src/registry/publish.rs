//! `run --publish`: the mesh's own services (those of the config file) are
//! written into the registry, so that applications outside the mesh that
//! look services up there (an SDK client) find them. Every key is written
//! under this agent's lease: when the agent stops or dies, what it wrote
//! goes with the lease, and what another agent of the mesh publishes too
//! is written again by that agent within one period.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use tokio::sync::watch;
use tracing::{info, warn};

use super::layout::{InstanceRecord, ServiceId, ServiceRecord, instance_key, service_key};
use crate::config::{MeshConfig, Service};

/// How often what should be in the registry is compared with what is.
const PERIOD: Duration = Duration::from_secs(3);
/// The publisher's lease: what it wrote outlives it by at most this.
const TTL: i64 = 10;

/// The keys and values `services` are published as.
pub fn records(prefix: &str, services: &[Service]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for svc in services {
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
pub fn start(
    endpoints: Vec<String>,
    prefix: String,
    user: Option<(String, String)>,
    files: watch::Receiver<MeshConfig>,
) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            let err = publish(&endpoints, &prefix, &user, files.clone()).await;
            warn!(error = %err, retry_in = ?backoff, "registry: publishing interrupted");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

/// One session: a lease, kept alive, and the keys kept equal to the
/// config under it. Returns why it ended.
async fn publish(
    endpoints: &[String],
    prefix: &str,
    user: &Option<(String, String)>,
    mut files: watch::Receiver<MeshConfig>,
) -> String {
    let mut options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1));
    if let Some((name, password)) = user {
        options = options.with_user(name, password);
    }
    let connected = tokio::time::timeout(
        Duration::from_secs(3),
        Client::connect(endpoints, Some(options)),
    )
    .await;
    let mut client = match connected {
        Ok(Ok(client)) => client,
        Ok(Err(err)) => return format!("connecting: {err}"),
        Err(_) => return "connecting: no member answered".into(),
    };
    let lease = match client.lease_grant(TTL, None).await {
        Ok(granted) => granted.id(),
        Err(err) => return format!("granting a lease: {err}"),
    };
    let (mut keeper, mut acks) = match client.lease_keep_alive(lease).await {
        Ok(stream) => stream,
        Err(err) => return format!("keeping the lease alive: {err}"),
    };
    let mut written: BTreeMap<String, String> = BTreeMap::new();
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = files.changed() => if changed.is_err() { return "stopping".into() },
        }
        if let Err(err) = keeper.keep_alive().await {
            return format!("keep-alive: {err}");
        }
        match tokio::time::timeout(PERIOD, acks.message()).await {
            Ok(Ok(Some(ack))) if ack.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return format!("lease {lease:x} expired"),
            Ok(Ok(None)) => return "the keep-alive stream ended".into(),
            Ok(Err(err)) => return format!("keep-alive: {err}"),
            Err(_) => return "no keep-alive answer".into(),
        }
        let want = records(prefix, &files.borrow().services);
        // What another agent's lease took away is written again.
        let current = match client
            .get(format!("{prefix}/"), Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(listing) => listing
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            Err(err) => return format!("reading what is published: {err}"),
        };
        for (key, value) in &want {
            if current.get(key) != Some(value) {
                let put = client
                    .put(
                        key.as_str(),
                        value.as_str(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await;
                if let Err(err) = put {
                    return format!("writing {key}: {err}");
                }
            }
        }
        for key in written.keys().filter(|k| !want.contains_key(*k)) {
            if let Err(err) = client.delete(key.as_str(), None).await {
                return format!("deleting {key}: {err}");
            }
        }
        if written != want {
            info!(keys = want.len(), "registry: published the mesh's services");
        }
        written = want;
    }
}
