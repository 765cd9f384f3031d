//! Capture: load the eBPF programs, attach them to the pods' and the
//! proxy's cgroups, pin everything in bpffs, and keep the kernel's tables of
//! enrolled pods and mesh services equal to the mesh state.
//!
//! Attachments are bpf links pinned in bpffs, so they outlive the agent:
//! a crashed or upgrading agent never leaves pods uncaptured. Start-up is
//! in two steps, so that there is no instant without capture:
//! [`Capture::load`] loads the programs (the kernel verifies them) and
//! hands over their tables, which the caller fills from the config; only
//! then does [`Programs::attach`] attach the programs, and remove the old
//! links once the new ones are in place. The new programs capture from the
//! instant they are attached, also when their tables are new maps (another
//! maps directory, or a pinned map of another layout replaced), and there
//! is never more than one program per hook afterwards.

mod bpffs;
pub mod cgroup;
pub mod enroll;
pub mod fast;
mod layout;
mod links;
pub mod reconcile;
pub mod tables;
mod watch;

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

use aya::{Ebpf, EbpfLoader};
use dataplane_common::globals;

pub use links::uninstall;
pub use tables::Tables;

/// Pinned maps live in this directory. A release that changes one map's
/// key, value or size does not move them all elsewhere: the map of another
/// layout is replaced on its own (see [`layout`]; its content is rebuilt
/// from the config), while the maps that kept their layout are reused. So
/// the per-connection maps (`DP_ORIG_DST`, `DP_CONNS`) stay shared by the
/// old and the new agent through an upgrade, and a connection captured by
/// the old programs and accepted by the new proxy still finds its original
/// destination. A change to the per-connection maps' layout would lose the
/// connections in flight at that instant; it is the one change to avoid.
const MAPS_DIR: &str = "maps-v1";

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));

/// Errors of the capture layer; each says what an operator can check.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup v2 is not mounted (no cgroup2 entry in /proc/mounts)")]
    NoCgroup2,
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object failed (is the kernel >= 5.10 with BTF?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("pinning link {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("eBPF map {name}: {message}")]
    Map { name: &'static str, message: String },
    #[error("pinned map {path}: {message}")]
    PinnedMap { path: PathBuf, message: String },
    #[error("the embedded eBPF object cannot be parsed (a broken build?): {0}")]
    Object(String),
    #[error(
        "reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+), which the fast path needs: {0}"
    )]
    NetnsCookie(std::io::Error),
}

/// Where and how to capture.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// bpffs directory owned by this agent (maps/ and links/ inside).
    pub pin_dir: PathBuf,
    /// cgroup v2 directory that holds every pod of the node.
    pub pods_cgroup: PathBuf,
    /// cgroup v2 directory of the proxy (the agent's own).
    pub proxy_cgroup: PathBuf,
    /// Where captured connections are sent.
    pub proxy_addr: SocketAddrV4,
    /// `SO_MARK` of the proxy's upstream sockets (never captured).
    pub proxy_mark: u32,
    /// What captured connects do while no proxy listens.
    pub fail_mode: FailMode,
    /// The kernel fast path (sk_msg): data between pods and the proxy on
    /// this node goes socket to socket.
    pub fast_path: bool,
}

/// What an enrolled pod's connect to a mesh service does while no proxy
/// listens on the node (the agent crashed, or stopped with no successor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FailMode {
    /// Straight to one of the service's endpoints (eight kept per node, one
    /// picked at random), without the proxy's policies, until a proxy listens
    /// again: the node's traffic survives the agent.
    #[default]
    Open,
    /// Refused at once (`EPERM`): nothing reaches a service unproxied.
    Closed,
}

impl FailMode {
    fn global(self) -> u32 {
        match self {
            FailMode::Open => dataplane_common::proxy_down::FAIL_OPEN,
            FailMode::Closed => dataplane_common::proxy_down::FAIL_CLOSED,
        }
    }
}

/// The capture programs, loaded but not attached yet, and the tables they
/// read. Fill the tables (see [`reconcile::Reconciler::start`]) before
/// attaching the programs: until then a previous agent's programs, if any,
/// keep capturing with their own tables.
pub struct Capture {
    pub tables: Tables,
    pub programs: Programs,
    /// With the fast path on: the proxy's handle for splicing past it.
    pub splicer: Option<std::sync::Arc<fast::Splicer>>,
}

/// The loaded programs; [`Programs::attach`] puts them to work.
pub struct Programs {
    /// Also kept so aya-log can read the programs' log ring buffer, and so
    /// that the unpinned getsockopt attachment lives as long as this.
    ebpf: Ebpf,
    cfg: CaptureConfig,
}

impl Capture {
    /// Loads the programs (the kernel verifies them) and opens their
    /// tables, reusing the maps pinned in [`MAPS_DIR`] under the pin
    /// directory and replacing those of another layout. Attaches nothing.
    pub fn load(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        let maps_dir = cfg.pin_dir.join(MAPS_DIR);
        bpffs::ensure_dir(&maps_dir)?;
        bpffs::ensure_dir(&cfg.pin_dir.join("links"))?;
        layout::replace_misfits(EBPF_OBJECT, &maps_dir)?;

        let proxy_ip4 = u32::from_ne_bytes(cfg.proxy_addr.ip().octets());
        let proxy_port = cfg.proxy_addr.port();
        let proxy_down = cfg.fail_mode.global();
        let fast_path = u32::from(cfg.fast_path);
        // Only the fast path needs it (and a kernel new enough to tell).
        let proxy_netns = if cfg.fast_path {
            fast::own_netns_cookie()?
        } else {
            0
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global(globals::PROXY_IP4, &proxy_ip4, true)
            .override_global(globals::PROXY_PORT, &proxy_port, true)
            .override_global(globals::PROXY_MARK, &cfg.proxy_mark, true)
            .override_global(globals::PROXY_DOWN, &proxy_down, true)
            .override_global(globals::FAST_PATH, &fast_path, true)
            .override_global(globals::PROXY_NETNS, &proxy_netns, true)
            .override_global(aya_log::LEVEL, &ebpf_log_level(), false)
            .load(EBPF_OBJECT)?;
        links::load_all(&mut ebpf, cfg.fast_path)?;
        let tables = Tables::take_from(&mut ebpf)?;
        let splicer = if cfg.fast_path {
            Some(std::sync::Arc::new(fast::Splicer::take_from(
                &mut ebpf,
                proxy_netns,
            )?))
        } else {
            None
        };
        Ok(Self {
            tables,
            splicer,
            programs: Programs {
                ebpf,
                cfg: cfg.clone(),
            },
        })
    }
}

/// The most verbose level the programs log at: the agent's own (from
/// `RUST_LOG`). Records above it are never written, so the default level
/// costs no ring-buffer write per captured connect in the kernel and no
/// wake-up and formatting per connect in the agent.
fn ebpf_log_level() -> u8 {
    level_number(tracing::level_filters::LevelFilter::current())
}

/// aya-log's level numbering (0: nothing).
fn level_number(filter: tracing::level_filters::LevelFilter) -> u8 {
    use aya_log::Level;
    use tracing::Level as T;
    match filter.into_level() {
        None => 0,
        Some(T::ERROR) => Level::Error as u8,
        Some(T::WARN) => Level::Warn as u8,
        Some(T::INFO) => Level::Info as u8,
        Some(T::DEBUG) => Level::Debug as u8,
        Some(T::TRACE) => Level::Trace as u8,
    }
}

impl Programs {
    /// Attaches and pins the programs, replacing the links a previous
    /// agent left behind (see [`links::attach_all`]). Call it once the
    /// tables are filled: the programs capture from this instant.
    pub fn attach(&mut self) -> Result<(), CaptureError> {
        links::attach_all(&mut self.ebpf, &self.cfg)
    }

    /// Starts forwarding the programs' aya-log records to `log`/`tracing`.
    /// Returns `None` (with a warning) if the log buffer cannot be opened:
    /// eBPF logging is a debugging aid, never a reason not to run.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                tracing::warn!(%err, "eBPF log records will not be shown");
                None
            }
        }
    }
}

/// Resolves `--pods-cgroup`: absolute paths are used as they are, relative
/// ones are taken under the cgroup v2 mount.
pub fn resolve_cgroup(path: &Path) -> Result<PathBuf, CaptureError> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(cgroup::cgroup2_mount()?.join(path))
}

#[cfg(test)]
mod tests {
    use tracing::level_filters::LevelFilter;

    use super::level_number;

    #[test]
    fn the_programs_log_at_the_agents_level_and_no_further() {
        assert_eq!(level_number(LevelFilter::OFF), 0);
        assert_eq!(
            level_number(LevelFilter::ERROR),
            aya_log::Level::Error as u8
        );
        assert_eq!(level_number(LevelFilter::INFO), aya_log::Level::Info as u8);
        // Debug records (one per captured connect) only when asked for.
        assert!(level_number(LevelFilter::INFO) < aya_log::Level::Debug as u8);
        assert_eq!(
            level_number(LevelFilter::DEBUG),
            aya_log::Level::Debug as u8
        );
        assert_eq!(
            level_number(LevelFilter::TRACE),
            aya_log::Level::Trace as u8
        );
    }
}
