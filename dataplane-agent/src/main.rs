//! `dataplane-agent`: the node agent of the sidecarless data plane.
//!
//! `run` captures enrolled pods' connections with eBPF and serves them from
//! the shared node proxy; `sidecar` runs the same proxy per pod (for
//! comparison); `cleanup` uninstalls the capture; `check-config` validates
//! a mesh config file; `status` shows a running agent's services and
//! endpoints.

// Outside input must never panic the agent: product code handles errors
// instead of unwrapping them (tests may unwrap; see clippy.toml).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![deny(clippy::dbg_macro, clippy::todo, clippy::unimplemented)]

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dataplane_agent::{app, balance, capture, config, registry, state};

// The allocator: jemalloc, because glibc's malloc keeps what connection
// bursts allocate. Measured by the churn part of `cargo xtask bench`
// (tests/src/bench/churn.rs: five bursts of 1,000 concurrent keep-alive
// connections, then a 10-minute soak of connection, endpoint, service and
// pod churn; the README's Benchmark section has the table), agent RSS in
// MiB, every candidate built from the same commit on a 2-vCPU VM, the
// last two columns after 30 s of quiet:
//
//   allocator                          baseline  after bursts  after soak
//   glibc                                  10.8          62.5        65.6
//   jemalloc, background purging           10.7          28.3        14.0
//   glibc, M_ARENA_MAX=2, malloc_trim/5s   10.6          29.3        14.1
//   mimalloc 3 (the crate's default)       51.5          77.3        48.1
//   mimalloc 2                             38.1          94.5        29.2
//
// What jemalloc still holds after the bursts is ~750 idle pooled upstream
// connections (open descriptors: 801, baseline 52). glibc with
// malloc_trim returns as much, but each trim took 1.3 ms (p50) to 5 ms
// holding the arena locks the proxy allocates under: a stall on the data
// path every 5 s. Build cost: tikv-jemallocator's C build adds about 35 s
// to a cold release build of the agent on 2 vCPUs (37 s on its own;
// mimalloc's would be 4 s).
//
// `background_thread`: freed memory is returned while the agent is idle,
// not only when a thread next allocates. `dirty_decay_ms: 1000`: within
// about a second (default 10 s). `muzzy_decay_ms: 0`: with MADV_DONTNEED
// at once, not MADV_FREE, whose pages stay in RSS until memory is short.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads its options from this symbol (tikv-jemalloc-sys
/// prefixes jemalloc's symbols with `_rjem_`).
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A `const char *` that can live in a static.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points to a string literal, immutable for the whole program.
unsafe impl Sync for MallocConf {}

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/dataplane";

#[derive(Parser)]
#[command(version, about = "Sidecarless service-mesh node agent")]
struct Cli {
    /// Log lines as text, or as one JSON object each (timestamp, level,
    /// target, message and fields) for a log pipeline. `RUST_LOG` filters
    /// either (default `info`).
    #[arg(
        long,
        env = "DATAPLANE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    /// Threads of the proxy's async runtime: `auto` (one per CPU the agent
    /// may use, from its CPU affinity and cgroup CPU quota) or a number.
    /// More threads than CPUs only adds wake-ups between them.
    #[arg(
        long,
        env = "DATAPLANE_WORKER_THREADS",
        default_value = "auto",
        global = true
    )]
    worker_threads: app::threads::Workers,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr in `format`, filtered by `RUST_LOG`.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Capture enrolled pods and run the node proxy.
    Run(Box<RunArgs>),
    /// Run as a per-pod sidecar proxy (for comparison with node mode):
    /// inside the pod's network namespace, traffic caught with nftables.
    Sidecar(SidecarArgs),
    /// Register one instance of a service in the registry (etcd) under a
    /// lease, and keep it registered until stopped (SIGTERM or Ctrl-C
    /// deregisters it; if this process dies, the instance expires with its
    /// lease).
    Register(RegisterArgs),
    /// Validate a mesh config file and exit.
    CheckConfig {
        /// The YAML file to check.
        path: PathBuf,
    },
    /// Show a running agent's services and endpoints: health (ejected,
    /// for how long; half-open probes), load, locality, circuit breakers.
    Status {
        /// The agent's admin endpoint.
        #[arg(long, env = "DATAPLANE_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
        /// Print the JSON of the agent's /clusters instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the TrafficPolicy CustomResourceDefinition (YAML), as
    /// deploy/base/crd.yaml holds it.
    Crd,
    /// Detach the capture programs and remove every pinned object (and,
    /// with --cni-conf-dir, the CNI plugin).
    Cleanup {
        #[arg(long, env = "DATAPLANE_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Also remove dataplane-cni from the network configurations in
        /// this directory (the node's /etc/cni/net.d) ...
        #[arg(long, env = "DATAPLANE_CNI_CONF_DIR", requires = "cni_bin_dir")]
        cni_conf_dir: Option<PathBuf>,
        /// ... and its binary from this one (the node's /opt/cni/bin).
        #[arg(long, env = "DATAPLANE_CNI_BIN_DIR", requires = "cni_conf_dir")]
        cni_bin_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Mesh config (services and enrolled pods), YAML.
    #[arg(long, env = "DATAPLANE_CONFIG")]
    config: PathBuf,
    /// Address the node proxy listens on; captured connects go there.
    #[arg(long, env = "DATAPLANE_PROXY_ADDR")]
    proxy_addr: SocketAddrV4,
    /// Admin endpoint: /metrics, /healthz, /ready, /config_dump, /clusters.
    #[arg(long, env = "DATAPLANE_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// cgroup v2 directory holding all pods (relative to the cgroup2 mount,
    /// or absolute).
    #[arg(long, env = "DATAPLANE_PODS_CGROUP", default_value = "kubepods")]
    pods_cgroup: PathBuf,
    /// cgroup v2 directory of this process, where the proxy-side hook is
    /// attached (default: read from /proc/self/cgroup; pass it when the
    /// agent runs in a private cgroup namespace).
    #[arg(long, env = "DATAPLANE_PROXY_CGROUP")]
    proxy_cgroup: Option<PathBuf>,
    /// bpffs directory for this agent's pinned maps and links.
    #[arg(long, env = "DATAPLANE_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// SO_MARK of the proxy's upstream sockets (decimal or 0x hex). Must
    /// not overlap mark bits the CNI or kube-proxy use (kube-proxy: 0x4000,
    /// 0x8000).
    #[arg(long, env = "DATAPLANE_PROXY_MARK", default_value = "0x539", value_parser = parse_mark)]
    mark: u32,
    /// This node's region and zone (its topology labels), for
    /// locality-aware load balancing.
    #[arg(long, env = "DATAPLANE_REGION", default_value = "")]
    region: String,
    #[arg(long, env = "DATAPLANE_ZONE", default_value = "")]
    zone: String,
    /// How often enrollment and the config file are re-checked.
    #[arg(long, env = "DATAPLANE_RESYNC", default_value = "1s", value_parser = humantime_serde::re::humantime::parse_duration)]
    resync: Duration,
    /// On SIGTERM, how long to let connections finish (HTTP clients are
    /// told to go at once) before exiting. Keep it below the pod's
    /// terminationGracePeriodSeconds (30 s by default), which ends in
    /// SIGKILL.
    #[arg(long, env = "DATAPLANE_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime_serde::re::humantime::parse_duration)]
    drain_timeout: Duration,
    /// Log one line per HTTP request (target `access`): caller, method,
    /// path, status, time to the response head, and the failure reason.
    #[arg(long, env = "DATAPLANE_ACCESS_LOG")]
    access_log: bool,
    /// While no agent listens on the node (crashed, or stopped with no
    /// successor), enrolled pods' connects to mesh services go straight to
    /// an endpoint (`open`) or are refused at once (`closed`). The kernel
    /// decides, so it holds whatever happened to the agent.
    #[arg(long, env = "DATAPLANE_FAIL_MODE", value_enum, default_value = "open")]
    fail_mode: capture::FailMode,
    /// Kernel fast path: data between enrolled pods and the proxy on this
    /// node goes socket to socket (sk_msg) instead of through TCP. Off by
    /// default: the kernel bounds no receive queue on that path (a pod
    /// sending faster than its peer reads queues kernel memory without
    /// limit) and some kernels report a wrong FIONREAD for such sockets;
    /// see the README.
    #[arg(long, env = "DATAPLANE_FAST_PATH", value_enum, default_value = "off")]
    fast_path: capture::fast::FastPath,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    kubernetes: KubernetesArgs,
    /// Unix socket where the CNI plugin (dataplane-cni) asks the agent to
    /// enroll a pod while its sandbox is created.
    #[arg(long, env = "DATAPLANE_CNI_SOCKET", default_value = dataplane_agent::cni::DEFAULT_SOCKET)]
    cni_socket: PathBuf,
    #[command(flatten)]
    cni_install: CniInstallArgs,
}

/// Installing the CNI plugin on the node.
#[derive(clap::Args)]
struct CniInstallArgs {
    /// The node's CNI configuration directory (/etc/cni/net.d, as this
    /// agent sees it). When set, the agent copies dataplane-cni into
    /// --cni-bin-dir and adds it to the end of the node's primary network
    /// configuration (the first file by name, as container runtimes pick
    /// it), and puts it back at each --resync if the network plugin
    /// rewrote the file. Unset: the plugin is installed by hand, or not.
    #[arg(long, env = "DATAPLANE_CNI_CONF_DIR", requires = "cni_bin_dir")]
    cni_conf_dir: Option<PathBuf>,
    /// The node's CNI plugin directory (/opt/cni/bin, as this agent sees
    /// it).
    #[arg(long, env = "DATAPLANE_CNI_BIN_DIR", requires = "cni_conf_dir")]
    cni_bin_dir: Option<PathBuf>,
    /// The plugin binary to install [default: dataplane-cni beside this
    /// executable].
    #[arg(long, env = "DATAPLANE_CNI_PLUGIN")]
    cni_plugin: Option<PathBuf>,
    /// The installed plugin's failPolicy: closed (a pod created while no
    /// agent answers is retried by the runtime, never started uncaptured)
    /// or open (it starts, uncaptured until the agent's next pass; logged
    /// and counted).
    #[arg(long, env = "DATAPLANE_CNI_FAIL_POLICY", default_value = "closed", value_parser = ["closed", "open"])]
    cni_fail_policy: String,
}

impl CniInstallArgs {
    fn installer(
        self,
        socket: &std::path::Path,
    ) -> anyhow::Result<Option<dataplane_agent::cni::install::Installer>> {
        let (Some(conf_dir), Some(bin_dir)) = (self.cni_conf_dir, self.cni_bin_dir) else {
            return Ok(None);
        };
        let plugin = match self.cni_plugin {
            Some(plugin) => plugin,
            None => std::env::current_exe()
                .context("finding this executable's directory for --cni-plugin")?
                .with_file_name(dataplane_agent::cni::install::PLUGIN),
        };
        anyhow::ensure!(
            plugin.is_file(),
            "--cni-plugin {}: no such file (build it with `cargo xtask build`, or point \
             --cni-plugin at it)",
            plugin.display()
        );
        Ok(Some(dataplane_agent::cni::install::Installer {
            conf_dir,
            bin_dir,
            plugin,
            socket: socket.to_path_buf(),
            fail_policy: self.cni_fail_policy,
        }))
    }
}

/// Discovery from the Kubernetes API server.
#[derive(clap::Args)]
struct KubernetesArgs {
    /// Read Services, EndpointSlices, Namespaces and this node's Pods from
    /// the Kubernetes API server, beside the config file. Pods are enrolled
    /// when their namespace has the label mesh.sidecarless.dev/enrolled=true
    /// or they have that annotation themselves ("false" opts a pod out).
    #[arg(long, env = "DATAPLANE_KUBERNETES")]
    kubernetes: bool,
    /// kubeconfig file for the API server. Default: the pod's service
    /// account (in a cluster), else KUBECONFIG, else ~/.kube/config.
    #[arg(long, env = "DATAPLANE_KUBECONFIG", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// This node's name, as pods' spec.nodeName gives it (the DaemonSet
    /// sets it from the downward API). Required with --kubernetes.
    #[arg(long, env = "DATAPLANE_NODE_NAME")]
    node_name: Option<String>,
    /// The last good state from the API, written every few seconds when it
    /// changes and read at start: an agent started while the API server
    /// is unreachable routes from it.
    #[arg(
        long,
        env = "DATAPLANE_KUBERNETES_SNAPSHOT",
        default_value = "/var/lib/dataplane/kubernetes.snapshot"
    )]
    kubernetes_snapshot: PathBuf,
    /// A snapshot older than this is not used.
    #[arg(long, env = "DATAPLANE_KUBERNETES_SNAPSHOT_MAX_AGE", default_value = "24h", value_parser = humantime_serde::re::humantime::parse_duration)]
    kubernetes_snapshot_max_age: Duration,
}

impl KubernetesArgs {
    fn config(&self) -> anyhow::Result<Option<dataplane_agent::kubernetes::KubernetesConfig>> {
        if !self.kubernetes {
            return Ok(None);
        }
        let node = self
            .node_name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .context(
                "--node-name (DATAPLANE_NODE_NAME) is required with --kubernetes: the agent \
                 enrolls the pods of its own node (the DaemonSet sets it from spec.nodeName)",
            )?;
        Ok(Some(dataplane_agent::kubernetes::KubernetesConfig {
            kubeconfig: self.kubeconfig.clone(),
            node,
            snapshot: Some(self.kubernetes_snapshot.clone()),
            snapshot_max_age: self.kubernetes_snapshot_max_age,
        }))
    }
}

/// Where the service registry (etcd) is.
#[derive(clap::Args, Clone)]
struct EtcdArgs {
    /// etcd members' client URLs, comma-separated, e.g.
    /// http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379.
    /// With none, `run` reads no registry.
    #[arg(long, env = "DATAPLANE_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Key prefix of the registry layout (the layout version is part of it).
    #[arg(long, env = "DATAPLANE_ETCD_PREFIX", default_value = registry::layout::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// etcd user, when etcd authentication is on (with --etcd-password).
    #[arg(long, env = "DATAPLANE_ETCD_USER", requires = "etcd_password")]
    etcd_user: Option<String>,
    /// Prefer the environment variable: a flag shows in `ps`.
    #[arg(long, env = "DATAPLANE_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// PEM file of the CA that signed the members' certificates: TLS to
    /// `https://` endpoints.
    #[arg(long, env = "DATAPLANE_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// PEM client certificate and key, for members that require one.
    #[arg(long, env = "DATAPLANE_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    #[arg(long, env = "DATAPLANE_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// The endpoints given, blanks dropped (an empty
    /// DATAPLANE_ETCD_ENDPOINTS, as the DaemonSet ships it, means none).
    fn endpoints(&self) -> Vec<String> {
        self.etcd_endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect()
    }

    fn access(&self) -> registry::client::Access {
        registry::client::Access {
            endpoints: self.endpoints(),
            user: self.etcd_user.clone().zip(self.etcd_password.clone()),
            tls: self.etcd_ca.clone().map(|ca| registry::client::TlsFiles {
                ca,
                identity: self.etcd_cert.clone().zip(self.etcd_key.clone()),
            }),
        }
    }
}

/// How `run` uses the registry.
#[derive(clap::Args)]
struct RegistryArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Tenants whose services this node reads, comma-separated or repeated
    /// (with etcd authentication, its user need read only those); none: all.
    #[arg(long = "tenant", env = "DATAPLANE_TENANTS", value_delimiter = ',')]
    tenants: Vec<String>,
    /// The last good registry state, written on each change, read at start:
    /// an agent started while every member is down routes from it.
    #[arg(
        long,
        env = "DATAPLANE_REGISTRY_SNAPSHOT",
        default_value = "/var/lib/dataplane/registry.snapshot"
    )]
    registry_snapshot: PathBuf,
    /// A snapshot older than this is not used (its endpoints are likely gone).
    #[arg(long, env = "DATAPLANE_REGISTRY_SNAPSHOT_MAX_AGE", default_value = "24h", value_parser = humantime_serde::re::humantime::parse_duration)]
    registry_snapshot_max_age: Duration,
    /// How long a registry change that removes all, or more than
    /// --registry-hold-share, of a service's endpoints at once waits before
    /// it applies (a bad push is undone meanwhile); 0s: at once.
    #[arg(long, env = "DATAPLANE_REGISTRY_HOLD", default_value = "30s", value_parser = humantime_serde::re::humantime::parse_duration)]
    registry_hold: Duration,
    /// Percent of a service's endpoints whose removal at once is held.
    #[arg(long, env = "DATAPLANE_REGISTRY_HOLD_SHARE", default_value = "50")]
    registry_hold_share: f64,
    /// Also write the config file's services and endpoints into the
    /// registry (under this agent's lease), so that applications outside
    /// the mesh find them there.
    #[arg(long, env = "DATAPLANE_PUBLISH")]
    publish: bool,
}

impl RegistryArgs {
    fn config(&self) -> anyhow::Result<Option<registry::source::RegistryConfig>> {
        if self.etcd.endpoints().is_empty() {
            return Ok(None);
        }
        if let Some(bad) = self
            .tenants
            .iter()
            .find(|t| !registry::layout::valid_segment(t))
        {
            anyhow::bail!("--tenant {bad:?}: must be one non-empty path segment (no '/')");
        }
        for (flag, path) in [
            ("--etcd-ca", &self.etcd.etcd_ca),
            ("--etcd-cert", &self.etcd.etcd_cert),
            ("--etcd-key", &self.etcd.etcd_key),
        ] {
            if let Some(path) = path {
                std::fs::metadata(path)
                    .with_context(|| format!("{flag} {}: cannot be read", path.display()))?;
            }
        }
        if !(0.0..=100.0).contains(&self.registry_hold_share) {
            anyhow::bail!(
                "--registry-hold-share {}: a percentage, 0 to 100",
                self.registry_hold_share
            );
        }
        Ok(Some(registry::source::RegistryConfig {
            access: self.etcd.access(),
            prefix: self.etcd.etcd_prefix.trim_end_matches('/').to_string(),
            tenants: self.tenants.clone(),
            snapshot: Some(self.registry_snapshot.clone()),
            snapshot_max_age: self.registry_snapshot_max_age,
            publish: self.publish,
            guard: registry::guard::GuardConfig {
                hold: self.registry_hold,
                max_share: self.registry_hold_share,
            },
        }))
    }
}

#[derive(clap::Args)]
struct RegisterArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The service's tenant (its namespace in the mesh).
    #[arg(long)]
    tenant: String,
    /// The service's name.
    #[arg(long)]
    service: String,
    /// This instance's id, unique within the service (e.g. the host name).
    #[arg(long)]
    id: String,
    /// Where this instance serves.
    #[arg(long)]
    address: SocketAddrV4,
    #[arg(long, default_value = "1")]
    weight: u32,
    #[arg(long, default_value = "")]
    region: String,
    #[arg(long, default_value = "")]
    zone: String,
    /// Application metadata, `key=value`, repeatable (not used for routing).
    #[arg(long = "metadata", value_parser = parse_metadata)]
    metadata: Vec<(String, String)>,
    /// The lease's time to live: how long a crashed instance stays listed.
    #[arg(long, default_value = "10s", value_parser = humantime_serde::re::humantime::parse_duration)]
    ttl: Duration,
}

fn parse_metadata(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected key=value"))?;
    Ok((k.to_string(), v.to_string()))
}

#[derive(clap::Args)]
struct SidecarArgs {
    /// Mesh config (services), YAML; re-read every --resync.
    #[arg(long, env = "DATAPLANE_CONFIG")]
    config: PathBuf,
    #[arg(long, default_value = "0.0.0.0:15001")]
    outbound_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Install nftables REDIRECT rules in this network namespace (removed
    /// on exit), as Istio's init container does.
    #[arg(long)]
    redirect: bool,
    /// Inbound ports to redirect (default: all but the sidecar's own).
    #[arg(long, value_delimiter = ',')]
    inbound_ports: Vec<u16>,
    #[arg(long, default_value = "0x539", value_parser = parse_mark)]
    mark: u32,
    #[arg(long, default_value = "1s", value_parser = humantime_serde::re::humantime::parse_duration)]
    resync: Duration,
    /// On SIGTERM, how long to let connections finish before exiting.
    #[arg(long, default_value = "20s", value_parser = humantime_serde::re::humantime::parse_duration)]
    drain_timeout: Duration,
    /// Log one line per HTTP request (target `access`).
    #[arg(long)]
    access_log: bool,
}

fn parse_mark(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|err| format!("not a 32-bit number: {err}"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            let settings = app::Settings {
                config: args.config,
                proxy_addr: args.proxy_addr,
                admin_addr: args.admin_addr,
                pods_cgroup: args.pods_cgroup,
                proxy_cgroup: args.proxy_cgroup,
                pin_dir: args.pin_dir,
                mark: args.mark,
                node: state::NodeContext {
                    mark: args.mark,
                    locality: balance::Locality {
                        region: args.region,
                        zone: args.zone,
                    },
                },
                resync: args.resync,
                drain_timeout: args.drain_timeout,
                access_log: args.access_log,
                fail_mode: args.fail_mode,
                fast_path: args.fast_path,
                registry: args.registry.config()?,
                kubernetes: args.kubernetes.config()?,
                cni_install: args.cni_install.installer(&args.cni_socket)?,
                cni_socket: args.cni_socket,
            };
            cli.worker_threads.build()?.block_on(app::run(settings))
        }
        Command::Sidecar(args) => {
            let settings = app::sidecar::Settings {
                config: args.config,
                outbound_addr: args.outbound_addr,
                inbound_addr: args.inbound_addr,
                admin_addr: args.admin_addr,
                redirect: args.redirect,
                inbound_ports: args.inbound_ports,
                node: state::NodeContext {
                    mark: args.mark,
                    locality: balance::Locality::default(),
                },
                resync: args.resync,
                drain_timeout: args.drain_timeout,
                access_log: args.access_log,
            };
            cli.worker_threads
                .build()?
                .block_on(app::sidecar::run(settings))
        }
        Command::Register(args) => {
            if args.etcd.endpoints().is_empty() {
                anyhow::bail!("--etcd-endpoints: give at least one etcd member");
            }
            let registration = registry::register::Registration {
                access: args.etcd.access(),
                prefix: args.etcd.etcd_prefix.trim_end_matches('/').to_string(),
                service: registry::layout::ServiceId {
                    tenant: args.tenant,
                    name: args.service,
                },
                id: args.id,
                instance: registry::layout::InstanceRecord {
                    address: args.address,
                    weight: args.weight,
                    region: args.region,
                    zone: args.zone,
                    metadata: args.metadata.into_iter().collect(),
                },
                ttl: args.ttl,
            };
            cli.worker_threads
                .build()?
                .block_on(registry::register::run(
                    registration,
                    app::runtime::shutdown_signal(),
                ))
        }
        Command::CheckConfig { path } => {
            let cfg = config::MeshConfig::load(&path)?;
            println!(
                "{}: ok ({} services, {} enrolled pods)",
                path.display(),
                cfg.services.len(),
                cfg.pods.len()
            );
            Ok(())
        }
        Command::Status { admin_addr, json } => {
            let body = app::status::fetch(admin_addr)?;
            if json {
                println!("{}", body.trim_end());
            } else {
                let clusters: dataplane_agent::admin::Clusters = serde_json::from_str(&body)
                    .with_context(|| format!("the agent at {admin_addr} sent unreadable JSON"))?;
                print!("{}", app::status::render(&clusters));
            }
            Ok(())
        }
        Command::Crd => {
            print!("{}", dataplane_agent::kubernetes::policy::crd_yaml());
            Ok(())
        }
        Command::Cleanup {
            pin_dir,
            cni_conf_dir,
            cni_bin_dir,
        } => {
            // The plugin first: once the capture is gone, a pod it would
            // enroll could not be captured anyway.
            if let (Some(conf_dir), Some(bin_dir)) = (cni_conf_dir, cni_bin_dir) {
                let changed = dataplane_agent::cni::install::uninstall(&conf_dir, &bin_dir)
                    .context("removing the CNI plugin")?;
                for path in &changed {
                    println!("cleanup: removed dataplane-cni from {}", path.display());
                }
            }
            let report = capture::uninstall(&pin_dir)
                .with_context(|| format!("cleaning up {}", pin_dir.display()))?;
            println!(
                "cleanup: detached {} links, removed {} maps from {}",
                report.links,
                report.maps,
                pin_dir.display()
            );
            Ok(())
        }
    }
}
