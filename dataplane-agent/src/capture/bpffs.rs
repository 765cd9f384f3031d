//! bpffs: make sure the pin directory lives on a mounted bpf filesystem.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use super::CaptureError;

/// `BPF_FS_MAGIC` from `<linux/magic.h>`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Creates `dir` (and parents), mounting bpffs on the first existing
/// ancestor below `/sys/fs` style roots if it is not bpffs yet. A node agent
/// must cope with nodes where nothing mounted `/sys/fs/bpf` at boot.
pub fn ensure_dir(dir: &Path) -> Result<(), CaptureError> {
    let err = |source| CaptureError::Bpffs {
        path: dir.to_path_buf(),
        source,
    };
    let root = bpffs_root(dir).ok_or_else(|| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "pin directory must be at least two levels below a bpffs mount point",
        ))
    })?;
    std::fs::create_dir_all(root).map_err(err)?;
    if !is_bpffs(root).map_err(err)? {
        mount_bpffs(root).map_err(err)?;
        tracing::info!(path = %root.display(), "mounted bpffs");
    }
    std::fs::create_dir_all(dir).map_err(err)
}

/// The mount point: the pin dir is `<root>/<agent dir>/<maps|links>`.
fn bpffs_root(dir: &Path) -> Option<&Path> {
    dir.parent()?.parent()
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
