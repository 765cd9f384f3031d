//! The agent's side of the CNI plugin (`dataplane-cni`): a unix socket on
//! which the plugin, run by the container runtime while it creates a
//! pod's sandbox, asks the agent to enroll the pod. The agent answers only
//! once the pod's cgroup is in the enrollment map, so no container of the
//! pod runs a moment uncaptured, whatever the order in which the API
//! server's watch, the cgroup watcher and the runtime act.
//!
//! The protocol: one JSON request line, one JSON answer line
//! ([`Request`], [`Answer`]). The socket is root's only (mode 0600).

pub mod install;

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::capture::reconcile::{Enrolled, Enroller};
use crate::config::MeshConfig;
use crate::discovery::Discovered;

/// Where the plugin finds the agent unless its config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/dataplane/cni.sock";

/// How long a connected plugin may take to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The longest request line read: a request is a few hundred bytes.
const MAX_REQUEST: usize = 16 * 1024;

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: String,
    pub pod_uid: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default)]
    pub container_id: String,
}

/// What the agent answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    /// The pod's cgroup is in the enrollment map (ADD, CHECK).
    pub enrolled: bool,
    /// Why the pod is or is not in the mesh.
    pub reason: String,
    /// Set when the agent should enroll the pod and cannot: the plugin
    /// fails the ADD or passes it as its failure policy says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The error is passing (the agent has not listed the API yet): the
    /// plugin asks the runtime to try again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry: bool,
}

/// Whether a pod belongs in the mesh, from what the agent knows when its
/// sandbox is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Enroll, as a pod of this tenant.
    Enroll(&'static str, Option<String>),
    Skip(&'static str),
    /// The agent cannot tell yet (the Kubernetes source has not listed):
    /// the plugin is told to try again.
    NotYet,
}

/// The rule: a pod the config in force lists is enrolled; one the
/// Kubernetes source knows and does not list is not (its namespace is not
/// enrolled, or it opted out); one it does not know yet is enrolled when
/// its namespace is (the watch has not delivered it; it stays enrolled
/// until it does, see `capture::reconcile`).
pub fn decide(
    uid: &str,
    namespace: &str,
    config: &MeshConfig,
    kubernetes: Option<&Discovered>,
) -> Decision {
    if let Some(pod) = config.pods.iter().find(|p| p.uid == uid) {
        return Decision::Enroll("enrolled by the mesh state", pod.tenant.clone());
    }
    let Some(kubernetes) = kubernetes else {
        return Decision::Skip("not enrolled by the config file");
    };
    if !kubernetes.complete {
        return Decision::NotYet;
    }
    // Then the source's own view: it may be ahead of the config in force
    // (applied by the run loop a moment later).
    if let Some(pod) = kubernetes.pods.iter().find(|p| p.uid == uid) {
        return Decision::Enroll("enrolled by the Kubernetes API", pod.tenant.clone());
    }
    if kubernetes.known_pods.contains(uid) {
        return Decision::Skip("not enrolled (namespace not enrolled, or the pod opts out)");
    }
    if kubernetes.enrolled_namespaces.contains(namespace) {
        let tenant = kubernetes.namespace_tenants.get(namespace).cloned();
        Decision::Enroll("its namespace is enrolled", tenant)
    } else {
        Decision::Skip("its namespace is not enrolled")
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    command: String,
    outcome: &'static str,
}

/// `dataplane_cni_*`.
#[derive(Debug, Clone, Default)]
pub struct CniMetrics {
    requests: Family<Outcome, Counter>,
    /// Pods the plugin let start without reaching the agent (fail-open),
    /// as its log file lists them.
    fail_open: Gauge,
    /// Whether the node's network configuration calls the plugin, when
    /// the agent installs it (`--cni-conf-dir`).
    pub installed: Gauge,
}

impl CniMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("dataplane_cni");
        r.register(
            "requests",
            "CNI plugin requests by command and outcome (enrolled, not_enrolled, error)",
            self.requests.clone(),
        );
        r.register(
            "fail_open_pods",
            "Pods the CNI plugin let start without reaching the agent (its fail-open log)",
            self.fail_open.clone(),
        );
        r.register(
            "installed",
            "1 while the node's primary CNI network configuration calls dataplane-cni (with --cni-conf-dir)",
            self.installed.clone(),
        );
    }

    fn count(&self, command: &str, outcome: &'static str) {
        let command = match command {
            "ADD" | "DEL" | "CHECK" => command.to_string(),
            _ => "other".to_string(),
        };
        self.requests
            .get_or_create(&Outcome { command, outcome })
            .inc();
    }
}

/// What the server needs to answer.
#[derive(Clone)]
pub struct Context {
    pub enroller: Enroller,
    /// Holds the config in force (file and every source merged).
    pub admin: Arc<crate::admin::Admin>,
    /// The Kubernetes source's state, when it runs.
    pub kubernetes: Option<watch::Receiver<Arc<Discovered>>>,
    pub metrics: CniMetrics,
}

/// Listens on `path` (a stale socket file of an earlier agent is
/// replaced; an agent beside it during an upgrade takes the path over,
/// and either answers the same way).
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, ctx: Context) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, ctx.clone()));
            }
            Err(err) => {
                warn!(%err, "CNI socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, ctx: Context) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let answer = match read.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())) {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let ctx = ctx.clone();
                // Enrolling walks the pods' cgroups: off the proxy's workers.
                tokio::task::spawn_blocking(move || handle(&request, &ctx))
                    .await
                    .unwrap_or_else(|err| error_answer(format!("agent task failed: {err}")))
            }
            Err(err) => error_answer(format!("unreadable request: {err}")),
        },
        Err(err) => error_answer(format!("reading the request: {err}")),
    };
    let mut text = serde_json::to_string(&answer).unwrap_or_default();
    text.push('\n');
    if let Err(err) = write.write_all(text.as_bytes()).await {
        debug!(%err, "CNI plugin left before the answer");
    }
}

fn error_answer(error: String) -> Answer {
    Answer {
        enrolled: false,
        reason: String::new(),
        error: Some(error),
        retry: false,
    }
}

fn handle(request: &Request, ctx: &Context) -> Answer {
    let pod = format!("{}/{}", request.pod_namespace, request.pod_name);
    let uid = request.pod_uid.as_str();
    if uid.is_empty() {
        ctx.metrics.count(&request.command, "error");
        return error_answer("no pod UID (K8S_POD_UID in CNI_ARGS)".into());
    }
    if request.command == "DEL" {
        ctx.enroller.forget(uid, &request.container_id);
        ctx.metrics.count("DEL", "not_enrolled");
        return Answer::default();
    }
    let kubernetes = ctx.kubernetes.as_ref().map(|rx| Arc::clone(&rx.borrow()));
    let decision = decide(
        uid,
        &request.pod_namespace,
        &ctx.admin.config.load(),
        kubernetes.as_deref(),
    );
    let answer = match (decision, request.command.as_str()) {
        (Decision::Skip(why), _) => {
            debug!(%pod, %uid, why, "CNI: pod not enrolled");
            Answer {
                enrolled: false,
                reason: why.into(),
                ..Answer::default()
            }
        }
        (Decision::Enroll(why, _), "CHECK") => {
            let enrolled = ctx.enroller.is_enrolled(uid);
            Answer {
                enrolled,
                reason: why.into(),
                error: (!enrolled).then(|| format!("pod {pod} should be enrolled and is not")),
                retry: false,
            }
        }
        (Decision::NotYet, _) => Answer {
            retry: true,
            ..error_answer("the agent has not read the Kubernetes API yet".into())
        },
        (Decision::Enroll(why, tenant), "ADD") => {
            match ctx
                .enroller
                .enroll(uid, tenant.as_deref(), &request.container_id)
            {
                Ok(result) => {
                    if result == Enrolled::New {
                        info!(%pod, %uid, why, "CNI: enrolled the pod at its creation");
                    }
                    Answer {
                        enrolled: true,
                        reason: why.into(),
                        ..Answer::default()
                    }
                }
                Err(err) => {
                    warn!(%pod, %uid, %err, "CNI: cannot enroll the pod");
                    error_answer(err.to_string())
                }
            }
        }
        (Decision::Enroll(..), other) => error_answer(format!("unknown command {other:?}")),
    };
    let outcome = match (&answer.error, answer.enrolled) {
        (Some(_), _) => "error",
        (None, true) => "enrolled",
        (None, false) => "not_enrolled",
    };
    ctx.metrics.count(&request.command, outcome);
    answer
}

/// Counts the pods the plugin's fail-open log lists (the plugin writes one
/// line per pod it let start without reaching the agent), and warns about
/// new ones: the periodic pass enrolls them if they belong in the mesh,
/// but their first connections may have gone uncaptured.
pub struct FailOpenLog {
    path: PathBuf,
    seen: BTreeSet<String>,
    metrics: CniMetrics,
}

impl FailOpenLog {
    pub fn new(path: PathBuf, metrics: CniMetrics) -> Self {
        Self {
            path,
            seen: BTreeSet::new(),
            metrics,
        }
    }

    pub fn check(&mut self) {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return;
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if self.seen.insert(line.to_string()) {
                warn!(
                    entry = line,
                    "the CNI plugin could not reach the agent and let a pod start (fail-open)"
                );
            }
        }
        self.metrics
            .fail_open
            .set(i64::try_from(self.seen.len()).unwrap_or(i64::MAX));
    }
}

/// The fail-open log beside the socket.
pub fn fail_open_log_path(socket: &Path) -> PathBuf {
    socket.with_file_name("cni-fail-open.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> MeshConfig {
        MeshConfig::parse(yaml, Path::new("t")).unwrap()
    }

    #[test]
    fn the_config_enrolls_first_then_the_kubernetes_namespace_of_unknown_pods() {
        let file = config("pods: [{uid: listed, tenant: t1}]\n");
        let kube = Discovered {
            known_pods: ["known-out".to_string()].into(),
            enrolled_namespaces: ["shop".to_string()].into(),
            namespace_tenants: [("shop".to_string(), "acme".to_string())].into(),
            complete: true,
            ..Discovered::default()
        };
        let listing = Discovered::default();
        assert_eq!(
            decide("new", "shop", &file, Some(&listing)),
            Decision::NotYet
        );
        assert_eq!(
            decide("listed", "any", &file, None),
            Decision::Enroll("enrolled by the mesh state", Some("t1".into()))
        );
        assert!(matches!(
            decide("other", "shop", &file, None),
            Decision::Skip(_)
        ));
        assert_eq!(
            decide("new", "shop", &file, Some(&kube)),
            Decision::Enroll("its namespace is enrolled", Some("acme".into()))
        );
        assert!(matches!(
            decide("new", "legacy", &file, Some(&kube)),
            Decision::Skip(_)
        ));
        // Known and not listed: opted out, though its namespace is enrolled.
        assert!(matches!(
            decide("known-out", "shop", &file, Some(&kube)),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn requests_and_answers_are_one_json_line_each() {
        let request: Request = serde_json::from_str(
            r#"{"command":"ADD","podUid":"u1","podNamespace":"shop","podName":"a","containerId":"c"}"#,
        )
        .unwrap();
        assert_eq!(request.pod_uid, "u1");
        let answer = serde_json::to_string(&Answer {
            enrolled: true,
            reason: "r".into(),
            ..Answer::default()
        })
        .unwrap();
        assert_eq!(answer, r#"{"enrolled":true,"reason":"r"}"#);
    }
}
