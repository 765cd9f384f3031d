//! The etcd source: list each prefix at a revision, then watch it from
//! the next one; on any failure keep what was known (fail-static), retry
//! with backoff, and list again once a member answers. Compaction past the
//! watch's revision means a fresh listing too.
//!
//! The client is connected to every configured member (etcd-client
//! balances over them); a member that dies breaks only the streams it
//! carried, which are re-opened on another. Watches require a leader
//! (`require_leader`), so a member cut off from the others ends its
//! watches instead of going silent, and HTTP/2 keep-alives end streams to
//! a member that stopped answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{info, warn};

use super::client;
use super::guard::{GuardConfig, RemovalGuard};
use super::layout::read_prefixes;
use super::metrics::RegistryMetrics;
use super::state::RegistryState;
use crate::config;
use crate::discovery::snapshot;

/// How to reach the registry and what to do with it.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The members, and how to log in.
    pub access: client::Access,
    /// Key prefix of the layout, e.g. `/dataplane/v1`.
    pub prefix: String,
    /// Tenants read; empty: all.
    pub tenants: Vec<String>,
    /// Where the last good state is kept; `None`: nowhere.
    pub snapshot: Option<std::path::PathBuf>,
    /// A snapshot older than this is not used.
    pub snapshot_max_age: Duration,
    /// Write the config file's services into the registry too.
    pub publish: bool,
    pub guard: GuardConfig,
}

/// The services the registry provides, as the proxy should use them.
pub type Published = Arc<Vec<config::Service>>;

/// What the per-prefix tasks tell the state owner.
enum Update {
    /// A fresh listing of `prefix`: replaces everything under it.
    Listed {
        prefix: String,
        kvs: Vec<(String, Vec<u8>)>,
    },
    /// One watch response's events, applied together (a transaction
    /// deleting every instance is one change, and judged as one).
    Changes(Vec<Change>),
    /// The prefix's stream is healthy (true) or broken (false).
    Health { prefix: String, up: bool },
}

enum Change {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// Starts the source: the snapshot (if any) is published at once, then
/// the registry's content as soon as it is read. Runs until the process
/// ends.
pub fn start(cfg: RegistryConfig, metrics: RegistryMetrics) -> watch::Receiver<Published> {
    let initial = initial_state(&cfg, &metrics);
    let (tx, rx) = watch::channel(Arc::new(initial));
    let (updates, inbox) = mpsc::channel(1024);
    let prefixes = read_prefixes(&cfg.prefix, &cfg.tenants);
    let listed = Arc::new(Notify::new());
    let watching = Arc::new(AtomicBool::new(false));
    if let Some(path) = cfg.snapshot.clone() {
        let scope = snapshot_scope(&prefixes);
        let (rx, listed, watching) = (rx.clone(), Arc::clone(&listed), Arc::clone(&watching));
        tokio::spawn(write_snapshots(path, scope, rx, listed, watching));
    }
    tokio::spawn(connect_and_watch(cfg.clone(), prefixes.clone(), updates));
    tokio::spawn(own_state(
        cfg, prefixes, inbox, tx, metrics, listed, watching,
    ));
    rx
}

/// The snapshot's services, or nothing (with a log line saying why).
fn initial_state(cfg: &RegistryConfig, metrics: &RegistryMetrics) -> Vec<config::Service> {
    let Some(path) = &cfg.snapshot else {
        return Vec::new();
    };
    let scope = snapshot_scope(&read_prefixes(&cfg.prefix, &cfg.tenants));
    match snapshot::read::<Vec<config::Service>>(path, &scope, cfg.snapshot_max_age) {
        Ok(snap) => {
            info!(
                path = %path.display(),
                services = snap.services.len(),
                age_s = snap.age.as_secs(),
                "registry: routing from the snapshot until the registry answers"
            );
            metrics.from_snapshot.set(1);
            snap.services
        }
        Err(snapshot::SnapshotError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Vec::new()
        }
        Err(err) => {
            warn!(%err, "registry: starting without a snapshot");
            Vec::new()
        }
    }
}

/// How often a snapshot is written again while nothing changes but every
/// watch holds, so that its age says when the registry was last known
/// current, not when it last changed.
const SNAPSHOT_REFRESH: Duration = Duration::from_secs(3600);

/// What a snapshot says it holds: the prefixes read, in a stable order.
fn snapshot_scope(prefixes: &[String]) -> String {
    let mut sorted: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.join(",")
}

/// Writes the published state to the snapshot after each change and each
/// complete listing, and hourly while every watch holds; never before the
/// registry was read once, and never on the clock alone while it is
/// unreachable. A task of its own: a slow disk delays no routing update.
async fn write_snapshots(
    path: std::path::PathBuf,
    scope: String,
    mut published: watch::Receiver<Published>,
    listed: Arc<Notify>,
    watching: Arc<AtomicBool>,
) {
    // What the receiver holds now came from the snapshot itself.
    published.borrow_and_update();
    let mut read_once = false;
    loop {
        // A change or a listing means the registry was read; the hourly
        // refresh alone does not.
        let read = tokio::select! {
            changed = published.changed() => {
                if changed.is_err() {
                    return;
                }
                true
            }
            () = listed.notified() => true,
            () = tokio::time::sleep(SNAPSHOT_REFRESH) => false,
        };
        read_once |= read;
        if !read_once || !(read || watching.load(Ordering::Acquire)) {
            continue;
        }
        let services = Arc::clone(&published.borrow_and_update());
        let (path, scope) = (path.clone(), scope.clone());
        match tokio::task::spawn_blocking(move || {
            snapshot::write(&path, &scope, services.as_slice())
        })
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(%err, "registry: snapshot not written"),
            Err(err) => warn!(%err, "registry: snapshot not written"),
        }
    }
}

/// Applies updates to the state, guards removals, publishes, and keeps
/// the health metrics.
async fn own_state(
    cfg: RegistryConfig,
    prefixes: Vec<String>,
    mut inbox: mpsc::Receiver<Update>,
    tx: watch::Sender<Published>,
    metrics: RegistryMetrics,
    complete_listing: Arc<Notify>,
    watching: Arc<AtomicBool>,
) {
    let mut state = RegistryState::new(&cfg.prefix);
    let mut guard = RemovalGuard::new(cfg.guard);
    // Until every prefix was listed once, the state is partial: publish
    // nothing from it (the snapshot, if any, stays in force).
    let mut listed: std::collections::HashSet<String> = Default::default();
    let mut down: std::collections::HashMap<String, Instant> = Default::default();
    let mut deadline: Option<Instant> = None;
    let mut stale_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let wake = deadline.map(tokio::time::Instant::from_std);
        let update = tokio::select! {
            update = inbox.recv() => match update {
                Some(update) => Some(update),
                None => return,
            },
            _ = sleep_until(wake) => None,
            _ = stale_tick.tick() => {
                metrics.set_stale(down.values().min().copied());
                continue;
            }
        };
        let mut changed = update.is_none();
        let mut listing_done = false;
        match update {
            Some(Update::Listed { prefix, kvs }) => {
                state.clear_under(&prefix);
                for (key, value) in kvs {
                    if let Err(err) = state.put(&key, &value) {
                        metrics.skipped.inc();
                        warn!(%err, "registry: record skipped");
                    }
                }
                listed.insert(prefix);
                metrics.listings.inc();
                changed = true;
                // Told once this listing's state is published (below).
                listing_done = listed.len() == prefixes.len();
            }
            Some(Update::Changes(changes)) => {
                for change in changes {
                    match change {
                        Change::Put { key, value } => {
                            if let Err(err) = state.put(&key, &value) {
                                metrics.skipped.inc();
                                warn!(%err, "registry: record skipped");
                            }
                        }
                        Change::Delete { key } => state.delete(&key),
                    }
                }
                changed = true;
            }
            Some(Update::Health { prefix, up }) => {
                if up {
                    if let Some(since) = down.remove(&prefix) {
                        info!(%prefix, down_for = ?since.elapsed(), "registry: watching again");
                    }
                } else {
                    down.entry(prefix.clone()).or_insert_with(|| {
                        warn!(%prefix, "registry: unreachable; routing on the last known endpoints");
                        Instant::now()
                    });
                }
                metrics.up.set(i64::from(down.is_empty()));
                watching.store(down.is_empty(), Ordering::Release);
                metrics.set_stale(down.values().min().copied());
            }
            None => {}
        }
        if !changed || listed.len() < prefixes.len() {
            continue;
        }
        let published = tx.borrow().clone();
        let guarded = guard.apply(&published, state.services(), Instant::now());
        deadline = guarded.next_deadline;
        metrics.held.inc_by(guarded.newly_held as u64);
        metrics
            .held_now
            .set(i64::try_from(guard.held()).unwrap_or(i64::MAX));
        metrics
            .services
            .set(i64::try_from(state.services().len()).unwrap_or(i64::MAX));
        metrics
            .instances
            .set(i64::try_from(state.instance_count()).unwrap_or(i64::MAX));
        metrics.from_snapshot.set(0);
        if *published != guarded.services {
            let _ = tx.send(Arc::new(guarded.services));
        }
        if listing_done {
            // After the send: the snapshot writer saves this very state.
            complete_listing.notify_one();
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Backoff between attempts to reach the registry.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Connects (again and again), then runs one list-and-watch per prefix;
/// any of them failing ends the round, marks every prefix down, and the
/// next round lists again.
async fn connect_and_watch(
    cfg: RegistryConfig,
    prefixes: Vec<String>,
    updates: mpsc::Sender<Update>,
) {
    let mut backoff = RETRY_MIN;
    loop {
        let started = Instant::now();
        let err = round(&cfg, &prefixes, &updates).await;
        for prefix in &prefixes {
            let update = Update::Health {
                prefix: prefix.clone(),
                up: false,
            };
            if updates.send(update).await.is_err() {
                return;
            }
        }
        // A round that ran a while was healthy: start the backoff over.
        if started.elapsed() > RETRY_MAX * 5 {
            backoff = RETRY_MIN;
        }
        warn!(error = %err, retry_in = ?backoff, "registry: connection lost");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

/// One connection's worth of watching; returns why it ended.
async fn round(
    cfg: &RegistryConfig,
    prefixes: &[String],
    updates: &mpsc::Sender<Update>,
) -> String {
    let client = match client::connect(&cfg.access).await {
        Ok(client) => client,
        Err(err) => return err,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for prefix in prefixes {
        tasks.spawn(list_and_watch(
            client.clone(),
            prefix.clone(),
            updates.clone(),
        ));
    }
    // The first one to end (always with an error) ends the round.
    let first = tasks.join_next().await;
    tasks.abort_all();
    match first {
        Some(Ok(Err(err))) => err,
        Some(Err(err)) => err.to_string(),
        Some(Ok(Ok(()))) | None => "watch ended".to_string(),
    }
}

/// Keys per listing request: a large registry is read in pages (one
/// answer must stay under gRPC's 4 MiB), all at the first page's revision.
const PAGE: i64 = 500;

/// Every key under `prefix` at one revision, and that revision.
async fn list(client: &mut Client, prefix: &str) -> Result<(i64, Vec<(String, Vec<u8>)>), String> {
    // The end of the range `prefix` covers: its last byte plus one (the
    // prefixes end with '/').
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last = last.saturating_add(1);
    }
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut kvs = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let page = client::timed(
            &format!("listing {prefix}"),
            client.get(from.clone(), Some(options)),
        )
        .await?;
        if revision == 0 {
            revision = page
                .header()
                .map(|h| h.revision())
                .ok_or_else(|| format!("listing {prefix}: no revision in the answer"))?;
        }
        kvs.extend(page.kvs().iter().map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        }));
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((revision, kvs)),
        }
    }
}

/// Lists `prefix`, then streams its changes until something fails.
/// Returns only with the reason it stopped.
async fn list_and_watch(
    mut client: Client,
    prefix: String,
    updates: mpsc::Sender<Update>,
) -> Result<(), String> {
    let closed = || "the registry's state owner is gone".to_string();
    let (revision, kvs) = list(&mut client, &prefix).await?;
    updates
        .send(Update::Listed {
            prefix: prefix.clone(),
            kvs,
        })
        .await
        .map_err(|_| closed())?;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let mut stream = client::timed(
        &format!("watching {prefix}"),
        client.watch(prefix.as_str(), Some(options)),
    )
    .await?;
    updates
        .send(Update::Health {
            prefix: prefix.clone(),
            up: true,
        })
        .await
        .map_err(|_| closed())?;
    loop {
        let Some(response) = stream
            .message()
            .await
            .map_err(|e| format!("watching {prefix}: {e}"))?
        else {
            return Err(format!("watching {prefix}: the stream ended"));
        };
        if response.compact_revision() > 0 {
            return Err(format!(
                "watching {prefix}: compacted past revision {revision} (now {}); listing again",
                response.compact_revision()
            ));
        }
        if response.canceled() {
            return Err(format!(
                "watching {prefix}: canceled by the server: {}",
                response.cancel_reason()
            ));
        }
        let changes: Vec<Change> = response
            .events()
            .iter()
            .filter_map(|event| {
                let kv = event.kv()?;
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                Some(match event.event_type() {
                    EventType::Put => Change::Put {
                        key,
                        value: kv.value().to_vec(),
                    },
                    EventType::Delete => Change::Delete { key },
                })
            })
            .collect();
        if !changes.is_empty() {
            updates
                .send(Update::Changes(changes))
                .await
                .map_err(|_| closed())?;
        }
    }
}
