//! `cgroup/sock_release`: frees the `DP_ORIG_DST` entry of a captured
//! socket that is closed before it was ever established, whatever the
//! reason (refused, timed out, or failed inside connect() before any SYN,
//! e.g. no ephemeral port left). Without it such entries would leak in a
//! pinned map until it fills and every captured connect fails.
//!
//! The hook runs in `inet_release`, which `AF_INET6` sockets go through
//! too, so the dual-stack sockets captured by connect6 are freed the same
//! way (keyed by cookie, the family does not matter).

use aya_ebpf::{
    EbpfContext as _, helpers::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
};

use crate::maps::ORIG_DST;

/// Let the release proceed (the verdict is ignored for this hook).
const PROCEED: i32 = 1;

#[cgroup_sock(sock_release)]
pub fn dp_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Usually absent (removed when the connection was established); the
    // lookup-free delete is the cheapest way to be sure.
    let _ = ORIG_DST.remove(cookie);
    PROCEED
}
