//! The Kubernetes manifests in `deploy/`: each kustomization renders
//! (`kubectl kustomize`), every object it renders is valid against the
//! OpenAPI schemas of the oldest and newest Kubernetes we target
//! (`kubernetes-validate --strict`: an unknown or misspelt field fails),
//! the rules the API server adds to the schemas hold, and so do the
//! properties the node agent depends on. Needs no privileges and no
//! cluster; `cargo xtask setup` installs kubectl and kubernetes-validate.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use dataplane_tests::binaries;
use serde::Deserialize as _;
use serde_json::Value;

/// Kubernetes versions whose schemas every object must satisfy: the oldest
/// we support and the newest kubernetes-validate ships.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// What the agent container may add to an empty capability set: see the
/// comments in deploy/base/daemonset.yaml for why each one is needed.
const AGENT_CAPABILITIES: &[&str] = &["BPF", "PERFMON", "NET_ADMIN"];
/// `dataplane-agent cleanup` only opens pinned links.
const CLEANUP_CAPABILITIES: &[&str] = &["BPF"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// The same rule as xtask's: `CARGO_TARGET_DIR` (relative to the
/// workspace) or `target`.
fn target_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    workspace().join(dir)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dp-manifests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A kustomization rendered, as text and as objects.
struct Rendered {
    yaml: String,
    objects: Vec<Value>,
}

fn kustomize(dir: &str) -> Rendered {
    let path = workspace().join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run kubectl ({err}): `cargo xtask setup` installs it \
                 (Debian's kubernetes-client)"
            )
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("kustomize prints UTF-8");
    let objects = parse_objects(&yaml);
    Rendered { yaml, objects }
}

fn parse_objects(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("kustomize output is YAML"))
        .filter(|obj| !obj.is_null())
        .collect()
}

fn base() -> &'static Rendered {
    static BASE: OnceLock<Rendered> = OnceLock::new();
    BASE.get_or_init(|| kustomize("deploy/base"))
}

fn uninstall() -> &'static Rendered {
    static UNINSTALL: OnceLock<Rendered> = OnceLock::new();
    UNINSTALL.get_or_init(|| kustomize("deploy/uninstall"))
}

/// The uninstall Job with its placeholders filled as the README's loop
/// fills them.
fn uninstall_for_node(node: &str, number: usize) -> String {
    uninstall()
        .yaml
        .replace("NODE_NAME", node)
        .replace("NODE_NUMBER", &number.to_string())
}

fn kubernetes_validate() -> PathBuf {
    target_dir().join("tools/kubernetes-validate/bin/kubernetes-validate")
}

/// Validates every object of `yaml` against each of
/// [`KUBERNETES_VERSIONS`]; fails unless each object passed (an unknown
/// kind only gives a warning, so the passes are counted).
fn assert_valid(name: &str, yaml: &str) {
    let count = parse_objects(yaml).len();
    assert!(count > 0, "{name} renders no object");
    let dir = temp_dir(name);
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).expect("write rendered manifests");
    let validate = kubernetes_validate();
    let reports: Vec<_> = KUBERNETES_VERSIONS
        .iter()
        .map(|version| {
            let out = Command::new(&validate)
                .args(["--strict", "--kubernetes-version", version])
                .arg(&file)
                .output();
            (version, out)
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    for (version, out) in reports {
        let out = out.unwrap_or_else(|err| {
            panic!(
                "cannot run {} ({err}): `cargo xtask setup` installs kubernetes-validate there",
                validate.display()
            )
        });
        let report = String::from_utf8_lossy(&out.stdout);
        let passed = report
            .lines()
            .filter(|line| line.starts_with("INFO") && line.contains(" passed for resource "))
            .count();
        assert!(
            out.status.success() && passed == count,
            "{name}: {passed} of {count} objects valid for Kubernetes {version}:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|obj| obj["kind"] == kind && obj["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn daemonset() -> &'static Value {
    find(&base().objects, "DaemonSet", "dataplane-agent")
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|list| pod[list].as_array())
        .flatten()
        .collect()
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    containers(pod)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|vars| vars.iter().find(|var| var["name"] == name))
        .unwrap_or_else(|| panic!("{} sets no {name}", container["name"]))
}

/// The value of `--flag=value` or `--flag value` in the container's
/// command line.
fn flag<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    let args: Vec<&str> = [&container["command"], &container["args"]]
        .into_iter()
        .flat_map(strings)
        .collect();
    let prefix = format!("{name}=");
    args.iter().enumerate().find_map(|(i, arg)| {
        arg.strip_prefix(&prefix)
            .or_else(|| (*arg == name).then(|| args.get(i + 1).copied()).flatten())
    })
}

/// The durations the agent's flags take: a number and one unit.
fn parse_duration(text: &str) -> Duration {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or_else(|| panic!("{text:?} has no unit"));
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().expect("a whole number");
    match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        other => panic!("unit {other:?} not understood in {text:?}"),
    }
}

#[test]
fn base_is_valid_for_kubernetes_1_30_to_1_37() {
    assert_valid("base", &base().yaml);
    let kinds: BTreeSet<&str> = base()
        .objects
        .iter()
        .filter_map(|obj| obj["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "DaemonSet",
            "Namespace",
            "ServiceAccount"
        ]),
    );
    for obj in &base().objects {
        if ![
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
        ]
        .contains(&obj["kind"].as_str().unwrap_or_default())
        {
            assert_eq!(
                obj["metadata"]["namespace"], "dataplane-system",
                "{} {}",
                obj["kind"], obj["metadata"]["name"]
            );
        }
    }
    // hostNetwork, hostPath volumes and added capabilities are beyond the
    // "baseline" Pod Security level.
    let ns = find(&base().objects, "Namespace", "dataplane-system");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
}

#[test]
fn uninstall_job_is_valid_once_its_placeholders_are_filled() {
    let jobs = &uninstall().objects;
    assert_eq!(jobs.len(), 1, "one Job");
    let job = &jobs[0];
    assert_eq!(job["kind"], "Job");
    assert_eq!(job["metadata"]["name"], "dataplane-cleanup-NODE_NUMBER");
    assert_eq!(job["metadata"]["namespace"], "dataplane-system");
    assert_eq!(pod_spec(job)["nodeName"], "NODE_NAME");
    let node = "ip-10-0-101-234.ap-southeast-2.compute.internal";
    let filled = uninstall_for_node(node, 12);
    assert!(!filled.contains("NODE_"), "a placeholder left:\n{filled}");
    assert_valid("uninstall", &filled);
    let job = &parse_objects(&filled)[0];
    assert_eq!(pod_spec(job)["nodeName"], node);
    let name = job["metadata"]["name"].as_str().expect("a name");
    assert!(
        name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
        "{name:?} is not a valid Job name"
    );
    let cleanup = container(pod_spec(job), "cleanup");
    assert_eq!(
        strings(&cleanup["command"])[..2],
        ["dataplane-agent", "cleanup"]
    );
    assert_eq!(
        flag(cleanup, "--pin-dir"),
        Some("/sys/fs/bpf/dataplane"),
        "the agent's default pin directory"
    );
}

/// Rules the API server enforces that the OpenAPI schemas cannot express,
/// and our own: nothing runs privileged or in the host's PID namespace.
#[test]
fn no_container_is_privileged_and_the_api_server_would_accept_them() {
    for workload in [daemonset(), &uninstall().objects[0]] {
        let pod = pod_spec(workload);
        assert_ne!(pod["hostPID"], true, "{}", workload["kind"]);
        for c in containers(pod) {
            let name = &c["name"];
            let sc = &c["securityContext"];
            assert_ne!(sc["privileged"], true, "{name} is privileged");
            assert_eq!(
                strings(&sc["capabilities"]["drop"]),
                ["ALL"],
                "{name} starts from no capability"
            );
            let added = strings(&sc["capabilities"]["add"]);
            assert!(!added.contains(&"SYS_ADMIN"), "{name} adds SYS_ADMIN");
            // "cannot set `allowPrivilegeEscalation` to false and
            // `privileged` to true / `capabilities.Add` CAP_SYS_ADMIN"
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            for mount in c["volumeMounts"].as_array().into_iter().flatten() {
                // "Bidirectional mount propagation is available only to
                // privileged containers"
                assert_ne!(
                    mount["mountPropagation"], "Bidirectional",
                    "{name}: {}",
                    mount["name"]
                );
            }
            let resources = &c["resources"];
            assert!(
                resources["requests"]["cpu"].is_string()
                    && resources["requests"]["memory"].is_string()
                    && resources["limits"]["memory"].is_string(),
                "{name} needs requests and a memory limit: {resources}"
            );
        }
        let seccomp = &pod["securityContext"]["seccompProfile"]["type"];
        assert_eq!(seccomp, "RuntimeDefault", "{}", workload["kind"]);
        // Only the agent reads the API (see the RBAC test).
        if workload["kind"] != "DaemonSet" {
            assert_eq!(pod["automountServiceAccountToken"], false);
        }
    }
}

#[test]
fn capabilities_are_the_needed_ones_each_with_its_reason() {
    let agent = container(pod_spec(daemonset()), "agent");
    let added = strings(&agent["securityContext"]["capabilities"]["add"]);
    assert_eq!(added, AGENT_CAPABILITIES);
    let init = container(pod_spec(daemonset()), "check-bpffs");
    assert!(strings(&init["securityContext"]["capabilities"]["add"]).is_empty());
    let cleanup = container(pod_spec(&uninstall().objects[0]), "cleanup");
    let added = strings(&cleanup["securityContext"]["capabilities"]["add"]);
    assert_eq!(added, CLEANUP_CAPABILITIES);

    // Comments do not survive rendering: read the sources. Every added
    // capability has a comment right above it.
    for (file, caps) in [
        ("deploy/base/daemonset.yaml", AGENT_CAPABILITIES),
        ("deploy/uninstall/cleanup-job.yaml", CLEANUP_CAPABILITIES),
    ] {
        let text = std::fs::read_to_string(workspace().join(file)).expect("read manifest");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for cap in caps {
            let at = lines
                .iter()
                .position(|line| *line == format!("- {cap}"))
                .unwrap_or_else(|| panic!("{file}: `- {cap}` not found on a line of its own"));
            assert!(
                at > 0 && lines[at - 1].starts_with('#'),
                "{file}: say why {cap} is needed in a comment above it"
            );
        }
    }
}

#[test]
fn probes_ask_the_admin_endpoint() {
    let agent = container(pod_spec(daemonset()), "agent");
    let admin = flag(agent, "--admin-addr").unwrap_or("127.0.0.1:15000");
    let (host, port) = admin.rsplit_once(':').expect("host:port");
    let port: u64 = port.parse().expect("a port");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/ready")] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], port, "{probe}");
        // With hostNetwork the kubelet reaches the node's loopback.
        assert_eq!(get["host"], host, "{probe}");
    }
}

#[test]
fn grace_period_outlasts_the_drain() {
    let pod = pod_spec(daemonset());
    let agent = container(pod, "agent");
    let drain = flag(agent, "--drain-timeout")
        .expect("the DaemonSet sets --drain-timeout, so that it visibly fits the grace period");
    let drain = parse_duration(drain);
    let grace = Duration::from_secs(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds is set"),
    );
    assert!(
        grace > drain,
        "the kubelet kills at {grace:?}, before the drain's {drain:?} is over"
    );
}

#[test]
fn daemonset_runs_on_every_node_and_upgrades_by_surge() {
    let ds = daemonset();
    let strategy = &ds["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    // The new agent starts beside the old one, which then drains: never a
    // node without an agent (tests/tests/upgrade.rs proves the handover).
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(strategy["rollingUpdate"]["maxSurge"], 1);
    let pod = pod_spec(ds);
    assert_eq!(
        pod["hostNetwork"], true,
        "the proxy is on the node's address"
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    let tolerates_all = pod["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null());
    assert!(
        tolerates_all,
        "tolerate every taint: {}",
        pod["tolerations"]
    );

    let agent = container(pod, "agent");
    let mounts = agent["volumeMounts"].as_array().expect("volume mounts");
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no {name} mount"))
    };
    assert_eq!(mount("bpffs")["mountPath"], "/sys/fs/bpf");
    assert_eq!(mount("cgroup")["readOnly"], true);
    // A subPath mount is never updated when the ConfigMap changes.
    assert!(mount("mesh")["subPath"].is_null());
    let config = env(agent, "DATAPLANE_CONFIG")["value"]
        .as_str()
        .expect("a path");
    let mesh_dir = mount("mesh")["mountPath"].as_str().expect("a path");
    assert_eq!(Path::new(config).parent(), Some(Path::new(mesh_dir)));
    let pods_cgroup = env(agent, "DATAPLANE_PODS_CGROUP")["value"]
        .as_str()
        .expect("a path");
    let cgroup_dir = mount("cgroup")["mountPath"].as_str().expect("a path");
    assert!(
        Path::new(pods_cgroup).starts_with(cgroup_dir),
        "{pods_cgroup} is not in the host's cgroup tree mounted at {cgroup_dir}"
    );
    assert_eq!(
        env(agent, "POD_UID")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.uid"
    );
    // The registry snapshot's default directory is the node's, so that it
    // outlives the container (a restart during a registry outage).
    assert_eq!(mount("state")["mountPath"], "/var/lib/dataplane");
    let volumes = pod["volumes"].as_array().expect("volumes");
    let state = volumes
        .iter()
        .find(|v| v["name"] == "state")
        .expect("state volume");
    assert_eq!(state["hostPath"]["path"], "/var/lib/dataplane");
}

#[test]
fn shipped_mesh_config_passes_check_config() {
    let cm = find(&base().objects, "ConfigMap", "dataplane-mesh");
    let mesh = cm["data"]["mesh.yaml"].as_str().expect("mesh.yaml");
    let dir = temp_dir("mesh");
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, mesh).expect("write mesh.yaml");
    let out = Command::new(binaries::agent().expect("agent binary"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run dataplane-agent check-config");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the agent container's command line as the kubelet would, in a
/// fake cgroup tree below `pods_cgroup`. The shell first writes its PID
/// into each of `listing_me` (cgroup.procs files), as the kernel lists a
/// container's processes; `exec` keeps that PID for the script.
/// `dataplane-agent` is a stand-in printing the proxy cgroup it was given
/// and its arguments.
fn run_start_script(pods_cgroup: &Path, listing_me: &[PathBuf], pod_uid: &str) -> Output {
    let agent = container(pod_spec(daemonset()), "agent");
    let command: Vec<&str> = strings(&agent["command"])
        .into_iter()
        .chain(strings(&agent["args"]))
        .collect();
    let bin = pods_cgroup.with_file_name("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    let fake = bin.join("dataplane-agent");
    std::fs::write(
        &fake,
        "#!/bin/sh\nprintf '%s\\n' \"$DATAPLANE_PROXY_CGROUP\" \"$@\"\n",
    )
    .expect("write stand-in");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let listing_me: Vec<String> = listing_me.iter().map(|p| p.display().to_string()).collect();
    Command::new("/bin/sh")
        .args([
            "-c",
            r#"for f in $LISTING_ME; do echo $$ > "$f"; done; unset LISTING_ME; exec "$@""#,
            "sh",
        ])
        .args(&command)
        .env("LISTING_ME", listing_me.join(" "))
        .env("PATH", path)
        .env("POD_UID", pod_uid)
        .env("DATAPLANE_PODS_CGROUP", pods_cgroup)
        .output()
        .expect("run the start script")
}

/// Creates each cgroup directory below `root`, with an empty cgroup.procs.
fn cgroups(root: &Path, dirs: &[String]) -> Vec<PathBuf> {
    dirs.iter()
        .map(|dir| {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("cgroup.procs"), "").expect("write cgroup.procs");
            dir.join("cgroup.procs")
        })
        .collect()
}

#[test]
fn start_script_hands_the_agent_its_own_cgroup() {
    let uid = "0b6c5a1e-3a5e-4c61-9d0f-2f7e4bd1a7c2";
    let uid_ = uid.replace('-', "_");
    let other = "7d1e0000-0000-4000-8000-000000000001";
    let other_ = other.replace('-', "_");
    let agent = container(pod_spec(daemonset()), "agent");
    let args = strings(&agent["args"]);
    // The kubelet's two cgroup drivers: this container's cgroup, the pod's
    // other container (the sandbox), and other pods' containers (in PID
    // namespaces of their own, so they may list the same PID number).
    let layouts = [
        (
            "systemd",
            "kubepods.slice",
            format!(
                "kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-aaa.scope"
            ),
            format!(
                "kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-pause.scope"
            ),
            vec![
                format!(
                    "kubepods-burstable.slice/kubepods-burstable-pod{other_}.slice/cri-containerd-ccc.scope"
                ),
                format!("kubepods-pod{other_}.slice/cri-containerd-ddd.scope"),
            ],
        ),
        (
            "cgroupfs",
            "kubepods",
            format!("pod{uid}/aaa"),
            format!("pod{uid}/pause"),
            vec![
                format!("besteffort/pod{other}/ccc"),
                format!("pod{other}/ddd"),
            ],
        ),
    ];
    for (driver, pods, own, sandbox, others) in layouts {
        let root = temp_dir(driver);
        let pods_cgroup = root.join("cgroup").join(pods);
        let own_procs = cgroups(&pods_cgroup, std::slice::from_ref(&own));
        cgroups(&pods_cgroup, &[sandbox]);
        let others_procs = cgroups(&pods_cgroup, &others);

        let listing_me: Vec<PathBuf> = own_procs.iter().chain(&others_procs).cloned().collect();
        let out = run_start_script(&pods_cgroup, &listing_me, uid);
        assert!(
            out.status.success(),
            "{driver}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut lines = stdout.lines();
        let own_dir = pods_cgroup.join(&own);
        assert_eq!(
            lines.next(),
            Some(own_dir.to_str().expect("UTF-8 path")),
            "{driver}: DATAPLANE_PROXY_CGROUP"
        );
        assert_eq!(lines.collect::<Vec<_>>(), args, "{driver}: arguments kept");

        // Only other pods list this PID: refuse, saying what to check.
        let out = run_start_script(&pods_cgroup, &others_procs, uid);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("DATAPLANE_PODS_CGROUP"),
            "{driver}: must refuse another pod's cgroup: {stderr}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// The image builds the agent with the bpf-linker `cargo xtask setup`
/// installs, which the eBPF programs are tested with.
#[test]
fn dockerfile_uses_the_bpf_linker_of_setup() {
    let read = |file: &str| std::fs::read_to_string(workspace().join(file)).expect(file);
    let dockerfile = read("Dockerfile");
    let in_image = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("ARG BPF_LINKER_VERSION="))
        .expect("Dockerfile: ARG BPF_LINKER_VERSION=");
    let setup = read("xtask/src/setup.rs");
    let in_setup = setup
        .lines()
        .find_map(|line| line.strip_prefix("const BPF_LINKER_VERSION: &str = \""))
        .and_then(|rest| rest.strip_suffix("\";"))
        .expect("setup.rs: const BPF_LINKER_VERSION");
    assert_eq!(in_image.trim(), in_setup);
}

#[test]
fn the_agent_may_read_what_it_watches_and_write_only_policy_status() {
    let agent = container(pod_spec(daemonset()), "agent");
    assert_eq!(env(agent, "DATAPLANE_KUBERNETES")["value"], "true");
    assert_eq!(
        env(agent, "DATAPLANE_NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName",
        "the agent enrolls its own node's pods"
    );
    let pod = pod_spec(daemonset());
    assert_eq!(
        pod["automountServiceAccountToken"], true,
        "the client's token"
    );
    let account = pod["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName");

    let role = find(&base().objects, "ClusterRole", "dataplane-agent");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let verbs = strings(&rule["verbs"]).join(",");
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                granted.insert(format!("{group}/{resource}: {verbs}"));
            }
        }
    }
    // Exactly what the Kubernetes source watches, and the one write: the
    // status of traffic policies.
    assert_eq!(
        granted,
        BTreeSet::from(
            [
                "/namespaces: list,watch",
                "/pods: list,watch",
                "/services: list,watch",
                "discovery.k8s.io/endpointslices: list,watch",
                "mesh.sidecarless.dev/trafficpolicies: list,watch",
                "mesh.sidecarless.dev/trafficpolicies/status: patch",
            ]
            .map(String::from)
        )
    );
    // The CRD it reads is installed with it.
    let crd = find(
        &base().objects,
        "CustomResourceDefinition",
        "trafficpolicies.mesh.sidecarless.dev",
    );
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let binding = find(&base().objects, "ClusterRoleBinding", "dataplane-agent");
    assert_eq!(binding["roleRef"]["name"], "dataplane-agent");
    assert_eq!(binding["subjects"][0]["name"], account);
    assert_eq!(binding["subjects"][0]["namespace"], "dataplane-system");
}

#[test]
fn the_cni_plugin_reaches_the_agent_through_a_node_directory() {
    let pod = pod_spec(daemonset());
    let agent = container(pod, "agent");
    let mount = agent["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == "/run/dataplane"))
        .expect("the agent mounts /run/dataplane, where its CNI socket is by default");
    let volume = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == mount["name"]))
        .expect("the mount's volume");
    // The same path on the node: the plugin, run by the container runtime
    // on the host, dials /run/dataplane/cni.sock.
    assert_eq!(volume["hostPath"]["path"], "/run/dataplane");
    assert_ne!(
        mount["readOnly"], true,
        "the agent creates the socket there"
    );
}

/// The node directory a container mounts at `path`, writable.
fn host_dir_at(pod: &Value, container: &Value, path: &str) -> String {
    let mount = container["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == path))
        .unwrap_or_else(|| panic!("{} mounts {path}", container["name"]));
    assert_ne!(mount["readOnly"], true, "{path} is written");
    let volume = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == mount["name"]))
        .expect("the mount's volume");
    volume["hostPath"]["path"]
        .as_str()
        .expect("a hostPath")
        .to_string()
}

#[test]
fn the_agent_installs_the_cni_plugin_into_the_nodes_cni_directories_and_cleanup_removes_it() {
    let pod = pod_spec(daemonset());
    let agent = container(pod, "agent");
    let env = |name: &str| -> String {
        agent["env"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["name"] == name))
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("the agent sets {name}"))
            .to_string()
    };
    let conf = env("DATAPLANE_CNI_CONF_DIR");
    let bin = env("DATAPLANE_CNI_BIN_DIR");
    assert_eq!(host_dir_at(pod, agent, &conf), "/etc/cni/net.d");
    assert_eq!(host_dir_at(pod, agent, &bin), "/opt/cni/bin");
    assert_eq!(env("DATAPLANE_CNI_FAIL_POLICY"), "closed");
    // The uninstall Job removes it from the same directories.
    let job_pod = pod_spec(&uninstall().objects[0]);
    let cleanup = container(job_pod, "cleanup");
    let args: Vec<&str> = cleanup["command"]
        .as_array()
        .expect("command")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    // The Job runs where the plugin may hold every other new pod.
    assert_eq!(job_pod["hostNetwork"], true, "the cleanup Job needs no CNI");
    // The plugin runs on the node, not in the image: static.
    let dockerfile = std::fs::read_to_string(workspace().join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("+crt-static") && dockerfile.contains("-p dataplane-cni"),
        "the Dockerfile builds dataplane-cni statically linked"
    );
    for (flag, node_dir) in [
        ("--cni-conf-dir", "/etc/cni/net.d"),
        ("--cni-bin-dir", "/opt/cni/bin"),
    ] {
        let dir = args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .unwrap_or_else(|| panic!("cleanup gets {flag}"));
        assert_eq!(host_dir_at(job_pod, cleanup, dir), node_dir);
    }
}
