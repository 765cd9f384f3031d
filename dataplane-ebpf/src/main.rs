//! eBPF programs that capture the TCP connections of enrolled pods.
//!
//! They are small on purpose: look up a map, rewrite, record, return. All
//! policy (which pods, which services, where to send them) is decided in user
//! space by the agent and handed over through the maps in [`maps`].
//!
//! The flow of one captured connection:
//! 1. `dp_connect4` (cgroup/connect4 on the pods' cgroup): the pod calls
//!    `connect(VIP:port)`; if the pod is enrolled and VIP:port is a mesh
//!    service, remember the destination under the socket cookie and rewrite
//!    the destination to the node proxy. `dp_connect6` (cgroup/connect6)
//!    does the same for dual-stack `AF_INET6` sockets dialling an IPv4
//!    service by its mapped address `::ffff:a.b.c.d`.
//! 2. `dp_sockops` (sock_ops on the pods' cgroup): when that socket is
//!    established, move the destination to a key the proxy can compute, the
//!    connection's 4-tuple; clean up when a connect fails.
//! 3. `dp_getsockopt` (cgroup/getsockopt on the proxy's cgroup): the proxy
//!    asks `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on the accepted socket, as it
//!    would behind an iptables REDIRECT, and gets the original destination.
//!
//! With `--fast-path on`, `dp_sockops` (also on the proxy's cgroup) puts
//! the ends of connections between pods and the proxy in a socket map, and
//! `dp_fast_msg` (sk_msg) moves their data socket to socket (see [`fast`]).
#![no_std]
#![no_main]

mod connect;
mod fast;
mod maps;
mod release;
mod sockops;
mod sockopt;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves no panic path is reachable; this only satisfies
    // the compiler.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
