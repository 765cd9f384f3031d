//! The kernel fast path's user-space side (`--fast-path on`): the network
//! namespace cookie the programs key sockets with, and attaching the
//! sk_msg program to its socket map. What the programs do is described in
//! the eBPF crate's `fast` module.

use std::os::fd::AsRawFd as _;

use aya::Ebpf;
use aya::maps::{MapData, SockHash};
use dataplane_common::{FastKey, maps};

use super::CaptureError;

/// `SO_NETNS_COOKIE` (Linux 5.14+), not in every libc crate version.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace this process (the node proxy)
/// runs in, as `bpf_get_netns_cookie` returns it to the programs.
pub fn own_netns_cookie() -> Result<u64, CaptureError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(CaptureError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`, and the
    // socket is open for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(CaptureError::NetnsCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// A handle on the fast path's socket map, for attaching the sk_msg
/// program to it (the program then runs for every socket put there).
pub fn socket_map_fd(ebpf: &Ebpf) -> Result<aya::maps::sock::SockMapFd, CaptureError> {
    let map_err = |message: String| CaptureError::Map {
        name: maps::FAST_SOCKS,
        message,
    };
    let map = ebpf
        .map(maps::FAST_SOCKS)
        .ok_or_else(|| map_err("missing from the eBPF object".into()))?;
    let hash: SockHash<&MapData, FastKey> =
        SockHash::try_from(map).map_err(|err| map_err(err.to_string()))?;
    hash.fd()
        .try_clone()
        .map_err(|err| map_err(err.to_string()))
}

/// Whether `release` (`uname -r`) is at least `major.minor`; an unreadable
/// release is taken as recent (the programs' load is the final test).
pub fn kernel_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => true,
    }
}

/// `--fast-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FastPath {
    /// Through TCP, as between any two sockets.
    #[default]
    Off,
    /// Socket to socket (sk_msg), for pods and the proxy on this node.
    On,
}

/// The path's line in the agent's log.
pub fn describe(on: bool) -> &'static str {
    if on {
        "on: data between pods and the proxy on this node goes socket to socket (sk_msg)"
    } else {
        "off: data between pods and the proxy goes through TCP"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(kernel_at_least("6.18.44-fc-v1045\n", (5, 15)));
        assert!(kernel_at_least("5.15.0-91-generic", (5, 15)));
        assert!(!kernel_at_least("5.14.0-362.el9.x86_64", (5, 15)));
        assert!(!kernel_at_least("4.19.0", (5, 15)));
        assert!(kernel_at_least("", (5, 15)));
    }

    #[test]
    fn the_namespace_cookie_is_stable_and_nonzero() {
        let first = own_netns_cookie().unwrap();
        assert_ne!(first, 0);
        assert_eq!(own_netns_cookie().unwrap(), first);
    }
}
