//! `dataplane-cni`: a chained CNI plugin (CNI spec 1.0) that enrolls a pod
//! in the mesh while the container runtime creates its sandbox.
//!
//! Placed after the plugins that make the pod's network (e.g. `bridge`
//! with `host-local`) in the node's conflist. On `ADD` it asks the node
//! agent, over the agent's unix socket, to enroll the pod named by
//! `K8S_POD_UID` in `CNI_ARGS`, and returns only once the agent says the
//! pod's cgroup is in the enrollment map (or that the pod is not in the
//! mesh): no container of the pod starts before its connections are
//! captured. It passes the previous plugin's result through unchanged.
//!
//! The agent unreachable or failing: with `"failPolicy": "closed"` (the
//! default) `ADD` fails and the runtime retries the sandbox, so no pod
//! starts uncaptured while the agent is down (pods of every namespace wait:
//! the plugin cannot tell which the agent would enroll); with `"open"` the
//! pod starts, the plugin logs it on stderr and appends it to the
//! fail-open log beside the socket, which the agent counts
//! (`dataplane_cni_fail_open_pods`); the agent's periodic pass enrolls it
//! later if it belongs in the mesh. `DEL` always succeeds. `CHECK` fails
//! when the agent says a pod that should be enrolled is not.
//!
//! Plugin configuration, beside `type: dataplane-cni`: `agentSocket`
//! (default `/run/dataplane/cni.sock`), `failPolicy` (`closed` | `open`),
//! `timeoutMs` (default 5000: how long to wait for the agent's answer).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const DEFAULT_SOCKET: &str = "/run/dataplane/cni.sock";
const DEFAULT_TIMEOUT_MS: u64 = 5000;

/// A CNI error: printed as the spec's error object, exit status 1.
#[derive(Debug)]
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

/// Codes of the CNI spec.
const INCOMPATIBLE_VERSION: u32 = 1;
const INVALID_ENV: u32 = 4;
const IO_FAILURE: u32 = 5;
const DECODE_FAILURE: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;
/// Ours (100 and up are the plugin's): the agent answered that it cannot
/// enroll the pod, or a pod that should be enrolled is not.
const NOT_ENROLLED: u32 = 100;

fn error(code: u32, msg: &str, details: impl Into<String>) -> CniError {
    CniError {
        code,
        msg: msg.to_string(),
        details: details.into(),
    }
}

/// The plugin's part of the network configuration.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    cni_version: String,
    socket: PathBuf,
    fail_open: bool,
    timeout: Duration,
    prev_result: Option<Value>,
}

fn parse_config(stdin: &[u8]) -> Result<Config, CniError> {
    let conf: Value = serde_json::from_slice(stdin).map_err(|e| {
        error(
            DECODE_FAILURE,
            "cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    let cni_version = conf["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    if !SUPPORTED.contains(&cni_version.as_str()) {
        return Err(error(
            INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!("{cni_version}; supported: {}", SUPPORTED.join(", ")),
        ));
    }
    let fail_open = match conf.get("failPolicy").map(|v| v.as_str()) {
        None | Some(Some("closed")) => false,
        Some(Some("open")) => true,
        Some(other) => {
            return Err(error(
                INVALID_CONFIG,
                "invalid failPolicy",
                format!("{other:?}: expected \"closed\" or \"open\""),
            ));
        }
    };
    let socket = match conf.get("agentSocket") {
        None => PathBuf::from(DEFAULT_SOCKET),
        Some(Value::String(path)) if !path.is_empty() => PathBuf::from(path),
        Some(other) => {
            return Err(error(
                INVALID_CONFIG,
                "invalid agentSocket",
                other.to_string(),
            ));
        }
    };
    let timeout = match conf.get("timeoutMs") {
        None => Duration::from_millis(DEFAULT_TIMEOUT_MS),
        Some(v) => Duration::from_millis(
            v.as_u64()
                .filter(|ms| *ms > 0)
                .ok_or_else(|| error(INVALID_CONFIG, "invalid timeoutMs", v.to_string()))?,
        ),
    };
    Ok(Config {
        cni_version,
        socket,
        fail_open,
        timeout,
        prev_result: conf.get("prevResult").cloned(),
    })
}

/// `CNI_ARGS`: `K=V;K=V`.
fn cni_arg(args: &str, key: &str) -> Option<String> {
    args.split(';')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

/// The pod, from `CNI_ARGS`; `None` when the runtime is not Kubernetes.
#[derive(Debug, Clone, PartialEq)]
struct PodRef {
    uid: String,
    namespace: String,
    name: String,
}

fn pod_of(args: &str) -> Option<PodRef> {
    Some(PodRef {
        uid: cni_arg(args, "K8S_POD_UID").filter(|u| !u.is_empty())?,
        namespace: cni_arg(args, "K8S_POD_NAMESPACE").unwrap_or_default(),
        name: cni_arg(args, "K8S_POD_NAME").unwrap_or_default(),
    })
}

/// One request to the agent and its answer.
fn ask_agent(cfg: &Config, command: &str, pod: &PodRef, container: &str) -> Result<Value, String> {
    let mut stream = UnixStream::connect(&cfg.socket).map_err(|e| {
        format!(
            "cannot reach the node agent at {}: {e}",
            cfg.socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(cfg.timeout))
        .and_then(|()| stream.set_write_timeout(Some(cfg.timeout)))
        .map_err(|e| e.to_string())?;
    let mut request = json!({
        "command": command,
        "podUid": pod.uid,
        "podNamespace": pod.namespace,
        "podName": pod.name,
        "containerId": container,
    })
    .to_string();
    request.push('\n');
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("writing to the node agent: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| {
        format!(
            "no answer from the node agent within {:?}: {e}",
            cfg.timeout
        )
    })?;
    serde_json::from_str(&line).map_err(|e| format!("unreadable answer from the node agent: {e}"))
}

/// Appends the pod to the fail-open log the agent counts.
fn record_fail_open(cfg: &Config, pod: &PodRef, why: &str) {
    let path = cfg.socket.with_file_name("cni-fail-open.log");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let line = format!(
        "{now} {}/{} {} {}\n",
        pod.namespace,
        pod.name,
        pod.uid,
        why.replace('\n', " ")
    );
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(err) = written {
        eprintln!("dataplane-cni: cannot append to {}: {err}", path.display());
    }
}

/// The agent's verdict on `ADD` or `CHECK`, with the failure policy applied.
fn enroll(cfg: &Config, command: &str, pod: &PodRef, container: &str) -> Result<(), CniError> {
    let failure = match ask_agent(cfg, command, pod, container) {
        Ok(answer) => match answer["error"].as_str() {
            None => return Ok(()),
            Some(err) if answer["retry"] == true => {
                error(TRY_AGAIN_LATER, "the node agent is not ready", err)
            }
            Some(err) => error(NOT_ENROLLED, "the node agent cannot enroll the pod", err),
        },
        Err(err) => error(TRY_AGAIN_LATER, "the node agent is unreachable", err),
    };
    if cfg.fail_open && command == "ADD" {
        eprintln!(
            "dataplane-cni: fail-open: pod {}/{} starts without the mesh's answer: {}",
            pod.namespace, pod.name, failure.details
        );
        record_fail_open(cfg, pod, &failure.details);
        return Ok(());
    }
    Err(failure)
}

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name).map_err(|_| error(INVALID_ENV, "missing environment variable", name))
}

/// Runs one command; what to print on stdout on success.
fn run(command: &str, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if command == "VERSION" {
        let version = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|c| c["cniVersion"].as_str().map(str::to_string))
            .unwrap_or_else(|| "1.0.0".into());
        return Ok(Some(
            json!({"cniVersion": version, "supportedVersions": SUPPORTED}),
        ));
    }
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let pod = pod_of(&args);
    let cfg = match parse_config(stdin) {
        Ok(cfg) => cfg,
        // Teardown must never be blocked, not even by a configuration
        // this plugin cannot read.
        Err(err) if matches!(command, "DEL" | "GC" | "STATUS") => {
            eprintln!(
                "dataplane-cni: {command} with an unusable configuration: {}: {}",
                err.msg, err.details
            );
            return Ok(None);
        }
        Err(err) => return Err(err),
    };
    if pod.is_none() && command == "ADD" {
        eprintln!(
            "dataplane-cni: no K8S_POD_UID in CNI_ARGS: not a Kubernetes pod, passed through"
        );
    }
    match command {
        "ADD" => {
            let container = env("CNI_CONTAINERID")?;
            let mut result = cfg.prev_result.clone().ok_or_else(|| {
                error(
                    INVALID_CONFIG,
                    "no prevResult",
                    "dataplane-cni is a chained plugin: list it after the plugin that creates the pod's interface",
                )
            })?;
            if let Some(pod) = &pod {
                enroll(&cfg, "ADD", pod, &container)?;
            }
            let Some(fields) = result.as_object_mut() else {
                return Err(error(
                    DECODE_FAILURE,
                    "prevResult is not an object",
                    result.to_string(),
                ));
            };
            fields.insert("cniVersion".into(), json!(cfg.cni_version));
            Ok(Some(result))
        }
        "DEL" => {
            // Best effort: a pod is deleted whether or not the agent hears.
            if let Some(pod) = &pod {
                let container = std::env::var("CNI_CONTAINERID").unwrap_or_default();
                let _ = ask_agent(&cfg, "DEL", pod, &container);
            }
            Ok(None)
        }
        "CHECK" => {
            if let Some(pod) = &pod {
                let container = env("CNI_CONTAINERID")?;
                enroll(&cfg, "CHECK", pod, &container)?;
            }
            Ok(None)
        }
        // CNI 1.1 commands this plugin has nothing to do for.
        "STATUS" | "GC" => Ok(None),
        other => Err(error(INVALID_ENV, "unknown CNI_COMMAND", other)),
    }
}

fn main() {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => run(&command, &stdin),
        Err(err) => Err(error(
            IO_FAILURE,
            "cannot read the network configuration",
            err.to_string(),
        )),
    };
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|c| c["cniVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| "1.0.0".into());
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(stdout, "{result}");
        }
        Ok(None) => {}
        Err(err) => {
            let _ = writeln!(
                stdout,
                "{}",
                json!({"cniVersion": version, "code": err.code, "msg": err.msg, "details": err.details})
            );
            let _ = stdout.flush();
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_name_the_pod() {
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
                    K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=0b6c5a1e-3a5e";
        assert_eq!(
            pod_of(args),
            Some(PodRef {
                uid: "0b6c5a1e-3a5e".into(),
                namespace: "shop".into(),
                name: "web-0".into()
            })
        );
        assert_eq!(pod_of("IgnoreUnknown=1"), None, "not a Kubernetes pod");
    }

    #[test]
    fn config_defaults_and_errors_name_the_field() {
        let cfg =
            parse_config(br#"{"cniVersion":"1.0.0","name":"k8s","type":"dataplane-cni"}"#).unwrap();
        assert_eq!(cfg.socket, std::path::Path::new(DEFAULT_SOCKET));
        assert!(!cfg.fail_open, "closed by default");
        assert_eq!(cfg.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        let err = parse_config(br#"{"cniVersion":"1.0.0","failPolicy":"maybe"}"#).unwrap_err();
        assert_eq!(
            (err.code, err.msg.as_str()),
            (INVALID_CONFIG, "invalid failPolicy")
        );
        assert!(parse_config(br#"{"cniVersion":"1.1.0"}"#).is_ok());
        let err = parse_config(br#"{"cniVersion":"9.9.9"}"#).unwrap_err();
        assert_eq!(err.code, INCOMPATIBLE_VERSION);
        let err = parse_config(b"not json").unwrap_err();
        assert_eq!(err.code, DECODE_FAILURE);
    }

    #[test]
    fn del_succeeds_whatever_the_configuration() {
        assert!(matches!(run("DEL", b"not json"), Ok(None)));
        assert!(matches!(
            run("DEL", br#"{"cniVersion":"1.0.0","failPolicy":"maybe"}"#),
            Ok(None)
        ));
        assert!(run("ADD", b"not json").is_err());
    }

    #[test]
    fn an_unreachable_agent_fails_closed_or_is_logged_open() {
        let dir = std::env::temp_dir().join(format!("dp-cni-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pod = PodRef {
            uid: "u1".into(),
            namespace: "shop".into(),
            name: "a".into(),
        };
        let mut cfg = Config {
            cni_version: "1.0.0".into(),
            socket: dir.join("cni.sock"),
            fail_open: false,
            timeout: Duration::from_millis(200),
            prev_result: None,
        };
        let err = enroll(&cfg, "ADD", &pod, "c1").unwrap_err();
        assert_eq!(err.code, TRY_AGAIN_LATER);
        cfg.fail_open = true;
        enroll(&cfg, "ADD", &pod, "c1").unwrap();
        let log = std::fs::read_to_string(dir.join("cni-fail-open.log")).unwrap();
        assert!(
            log.contains("shop/a u1 cannot reach the node agent"),
            "{log}"
        );
        // CHECK reports the truth whatever the policy.
        assert!(enroll(&cfg, "CHECK", &pod, "c1").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
