//! `SO_ORIGINAL_DST`: the destination a captured connection was meant for.
//!
//! In node mode the answer comes from the capture programs (cgroup
//! getsockopt); behind an iptables/nftables REDIRECT (sidecar mode) it comes
//! from conntrack. Same call, so the proxy does not care which.

use std::net::{Ipv4Addr, SocketAddrV4};

use dataplane_common::{SO_ORIGINAL_DST, SOL_IP};

pub fn original_dst(stream: &impl std::os::fd::AsRawFd) -> std::io::Result<SocketAddrV4> {
    // SAFETY: zeroed sockaddr_in is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe `addr`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            SOL_IP,
            SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if addr.sin_family != libc::AF_INET as libc::sa_family_t {
        return Err(std::io::Error::other("SO_ORIGINAL_DST is not IPv4"));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}
