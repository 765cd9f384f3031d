//! Loading the programs, attaching them as pinned bpf links, replacing the
//! links a previous agent left, and removing everything on uninstall.

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{
    CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockopt, ProgramError, SkMsg, SockOps,
};

use super::{CaptureConfig, CaptureError};

/// Pinned link names, relative to `<pin_dir>/links`.
const LINK_CONNECT4: &str = "connect4";
/// connect6: dual-stack sockets dialling a service by its IPv4-mapped
/// address (the kernel runs connect6, not connect4, for them).
const LINK_CONNECT6: &str = "connect6";
const LINK_SOCKOPS: &str = "sockops";
const LINK_SOCK_RELEASE: &str = "sock_release";

/// The program `$name` of the object, as a `$ty`.
macro_rules! program {
    ($ebpf:expr, $ty:ty, $name:literal) => {{
        let prog: &mut $ty = $ebpf
            .program_mut($name)
            .ok_or_else(|| CaptureError::Map {
                name: $name,
                message: "program missing from the eBPF object".into(),
            })?
            .try_into()
            .map_err(prog_err($name))?;
        prog
    }};
}

/// Attaches the (loaded) program `$name` of type `$ty` to `$cgroup` and
/// returns it with the attachment's id (the attachment is owned by the
/// program, so by its `Ebpf`, until taken).
macro_rules! attach {
    ($ebpf:expr, $ty:ty, $name:literal, $cgroup:expr) => {{
        let prog = program!($ebpf, $ty, $name);
        // bpf links on a cgroup always coexist with other links there (the
        // kernel rejects the ALLOW_MULTI flag for them), which is what lets
        // a new agent's link overlap the old one so that capture never stops.
        let id = prog
            .attach($cgroup, CgroupAttachMode::Single)
            .map_err(prog_err($name))?;
        (prog, id)
    }};
}

/// Like [`attach!`], returning the attachment as an `FdLink` to be pinned.
macro_rules! attach_fd_link {
    ($ebpf:expr, $ty:ty, $name:literal, $cgroup:expr) => {{
        let (prog, id) = attach!($ebpf, $ty, $name, $cgroup);
        let link = prog.take_link(id).map_err(prog_err($name))?;
        FdLink::try_from(link).map_err(|err| CaptureError::Pin {
            path: PathBuf::from($name),
            message: err.to_string(),
        })?
    }};
}

fn prog_err(name: &'static str) -> impl Fn(ProgramError) -> CaptureError {
    move |source| CaptureError::Program { name, source }
}

/// Loads every program into the kernel (which verifies it) without
/// attaching anything, so that the caller can fill the tables first. The
/// fast path's sk_msg program only when it is on: a kernel without it
/// still runs everything else.
pub fn load_all(ebpf: &mut Ebpf, fast_path: bool) -> Result<(), CaptureError> {
    if fast_path {
        program!(ebpf, SkMsg, "dp_fast_msg")
            .load()
            .map_err(prog_err("dp_fast_msg"))?;
    }
    program!(ebpf, CgroupSockopt, "dp_getsockopt")
        .load()
        .map_err(prog_err("dp_getsockopt"))?;
    program!(ebpf, CgroupSock, "dp_sock_release")
        .load()
        .map_err(prog_err("dp_sock_release"))?;
    program!(ebpf, SockOps, "dp_sockops")
        .load()
        .map_err(prog_err("dp_sockops"))?;
    program!(ebpf, CgroupSockAddr, "dp_connect4")
        .load()
        .map_err(prog_err("dp_connect4"))?;
    program!(ebpf, CgroupSockAddr, "dp_connect6")
        .load()
        .map_err(prog_err("dp_connect6"))?;
    Ok(())
}

/// Attaches the programs loaded by [`load_all`]. The pods' side (connect4,
/// connect6, sock_ops, sock_release) is pinned, replacing a previous
/// agent's links, so pods stay captured while no agent runs. The proxy's
/// side (getsockopt) is deliberately not pinned: it only serves the proxy
/// in this process, so it lives and dies with it (it stays attached while
/// `ebpf` is alive) and can never be left behind.
pub fn attach_all(ebpf: &mut Ebpf, cfg: &CaptureConfig) -> Result<(), CaptureError> {
    let pods = open_cgroup(&cfg.pods_cgroup)?;
    let proxy = open_cgroup(&cfg.proxy_cgroup)?;
    let links_dir = cfg.pin_dir.join("links");

    // Order: the proxy-side answer first, so that no connection redirected
    // by the new connect4/connect6 meets a proxy that cannot learn its
    // destination; sock_ops before the connect hooks, so that every socket
    // they capture has its destination handed over on establishment.
    let _ = attach!(ebpf, CgroupSockopt, "dp_getsockopt", &proxy);
    if cfg.fast_path {
        attach_fast_path(ebpf, cfg, &proxy)?;
    }
    let release = attach_fd_link!(ebpf, CgroupSock, "dp_sock_release", &pods);
    let sockops = attach_fd_link!(ebpf, SockOps, "dp_sockops", &pods);
    let connect4 = attach_fd_link!(ebpf, CgroupSockAddr, "dp_connect4", &pods);
    let connect6 = attach_fd_link!(ebpf, CgroupSockAddr, "dp_connect6", &pods);
    replace_pinned(release, &links_dir.join(LINK_SOCK_RELEASE))?;
    replace_pinned(sockops, &links_dir.join(LINK_SOCKOPS))?;
    replace_pinned(connect4, &links_dir.join(LINK_CONNECT4))?;
    replace_pinned(connect6, &links_dir.join(LINK_CONNECT6))?;
    tracing::info!(
        pods_cgroup = %cfg.pods_cgroup.display(),
        proxy_cgroup = %cfg.proxy_cgroup.display(),
        "capture programs attached"
    );
    Ok(())
}

/// The fast path: the sk_msg program on its socket map (a socket put there
/// from now on carries it), and sock_ops on the proxy's cgroup too, so
/// that the proxy's sockets join the map. Neither is pinned: they serve
/// this proxy and go with it (sockets already in the map keep the program
/// they were given). If the proxy's cgroup is inside the pods' one, the
/// pods' sock_ops already sees the proxy's sockets.
fn attach_fast_path(
    ebpf: &mut Ebpf,
    cfg: &CaptureConfig,
    proxy: &File,
) -> Result<(), CaptureError> {
    let map = super::fast::socket_map_fd(ebpf)?;
    program!(ebpf, SkMsg, "dp_fast_msg")
        .attach(&map)
        .map_err(prog_err("dp_fast_msg"))?;
    if !cfg.proxy_cgroup.starts_with(&cfg.pods_cgroup) {
        let _ = attach!(ebpf, SockOps, "dp_sockops", proxy);
    }
    tracing::info!("kernel fast path {}", super::fast::describe(true));
    Ok(())
}

fn open_cgroup(path: &Path) -> Result<File, CaptureError> {
    File::open(path).map_err(|source| CaptureError::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

/// Pins `new` at `path`, atomically replacing a link a previous agent
/// pinned there: `new` is pinned under a temporary name, then renamed over
/// the old pin, which drops the old link (detaching it). At every instant
/// at least one of the two is attached, and a crash at any point leaves a
/// pinned, attached link behind.
fn replace_pinned(new: FdLink, path: &Path) -> Result<(), CaptureError> {
    let pin_err = |message: String| CaptureError::Pin {
        path: path.to_path_buf(),
        message,
    };
    // bpffs refuses names with dots: no "<name>.new".
    let mut staging = path.as_os_str().to_owned();
    staging.push("_staging");
    let staging = PathBuf::from(staging);
    if staging.exists() {
        // Left by an agent that died between pin and rename.
        detach_pinned(&staging).map_err(pin_err)?;
    }
    let replacing = path.exists();
    let pinned = new.pin(&staging).map_err(|err| pin_err(err.to_string()))?;
    std::fs::rename(&staging, path).map_err(|err| pin_err(format!("rename: {err}")))?;
    // The pin now lives at `path`; closing our fd leaves it attached.
    drop(FdLink::from(pinned));
    if replacing {
        tracing::info!(link = %path.display(), "replaced the link of a previous agent");
    }
    Ok(())
}

/// Removes a pinned link; dropping the last reference detaches it.
fn detach_pinned(path: &Path) -> Result<(), String> {
    match PinnedLink::from_pin(path) {
        Ok(link) => link.unpin().map(drop).map_err(|err| err.to_string()),
        // Not a link (a stale file): just remove it.
        Err(_) => std::fs::remove_file(path).map_err(|err| err.to_string()),
    }
}

/// `links/` and every `maps*/` directory (one per map layout version).
fn pin_subdirs(pin_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == "links" || n.starts_with("maps"))
        })
        .collect()
}

/// What `uninstall` removed.
#[derive(Debug, Default)]
pub struct UninstallReport {
    pub links: usize,
    pub maps: usize,
}

/// Detaches every pinned link and removes every pinned map under
/// `pin_dir`, then the directory itself. Idempotent.
pub fn uninstall(pin_dir: &Path) -> Result<UninstallReport, CaptureError> {
    let mut report = UninstallReport::default();
    let io_err = |path: &Path, source| CaptureError::Bpffs {
        path: path.to_path_buf(),
        source,
    };
    for dir in pin_subdirs(pin_dir) {
        let is_links = dir.file_name().is_some_and(|n| n == "links");
        let count = if is_links {
            &mut report.links
        } else {
            &mut report.maps
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if is_links {
                detach_pinned(&path).map_err(|message| CaptureError::Pin {
                    path: path.clone(),
                    message,
                })?;
            } else {
                std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
            }
            *count += 1;
        }
        std::fs::remove_dir(&dir).map_err(|e| io_err(&dir, e))?;
    }
    match std::fs::remove_dir(pin_dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(io_err(pin_dir, err)),
        _ => Ok(report),
    }
}
