//! bpffs: make sure the pin directory lives on a mounted bpf filesystem.
//!
//! In a container, a bpffs mounted by the agent itself would vanish with
//! the container, and its pins (the capture) with it; it survives only
//! with bidirectional mount propagation, which Kubernetes allows only to
//! privileged containers. So the DaemonSet (deploy/base) uses the node's
//! own bpffs at /sys/fs/bpf, and an init container checks it is there.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use super::CaptureError;

/// `BPF_FS_MAGIC` from `<linux/magic.h>`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where bpffs is conventionally mounted; the only place this agent mounts
/// it by itself.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Creates `dir`, which must be on a bpf filesystem. If it is below
/// `/sys/fs/bpf` and nothing is mounted there yet (some nodes do not mount
/// bpffs at boot), bpffs is mounted there first; it is never mounted
/// anywhere else, so a mistaken `--pin-dir` cannot hide another filesystem.
pub fn ensure_dir(dir: &Path) -> Result<(), CaptureError> {
    let err = |source| CaptureError::Bpffs {
        path: dir.to_path_buf(),
        source,
    };
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing).map_err(err)? {
        let root = Path::new(BPFFS_ROOT);
        // Mount only if `dir` is strictly below the root and nothing below
        // the root exists yet (so the mount hides nothing).
        let below_root = dir.starts_with(root) && dir != root;
        let nothing_hidden = root.starts_with(existing);
        if !(below_root && nothing_hidden) {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "not on a bpf filesystem: mount one (mount -t bpf bpf {BPFFS_ROOT}) \
                     or choose a directory below {BPFFS_ROOT}"
                ),
            )));
        }
        std::fs::create_dir_all(root).map_err(err)?;
        mount_bpffs(root).map_err(err)?;
        tracing::info!(path = BPFFS_ROOT, "mounted bpffs");
    }
    std::fs::create_dir_all(dir).map_err(err)
}

fn is_bpffs(path: &Path) -> std::io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid NUL-terminated path and a buffer of the right type.
    if unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so the buffer is initialised.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_type == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> std::io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
