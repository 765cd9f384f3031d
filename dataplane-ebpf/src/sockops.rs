//! `sock_ops`: hand the original destination from the connecting socket's
//! cookie over to the connection's 4-tuple, which the proxy can compute
//! from the socket it accepts. Connects that never establish are cleaned
//! up by `sock_release` (for both socket families).
//!
//! A dual-stack socket (`AF_INET6`) captured by connect6 talks IPv4 on the
//! wire: its addresses are `::ffff:a.b.c.d` and the proxy accepts it as a
//! plain IPv4 connection. It is keyed by the same IPv4 4-tuple as an
//! `AF_INET` socket, so the proxy's `SO_ORIGINAL_DST` lookup finds it.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB},
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::error;
use dataplane_common::{ConnKey, stats, v4_mapped};

use crate::fast;
use crate::maps::{CONNS, ORIG_DST, count};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sock_ops]
pub fn dp_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && let Some((local, remote)) = ipv4_ends(&ctx)
    {
        let captured = on_established(&ctx, local, remote);
        if fast::enabled() {
            fast::on_established(&ctx, local, remote, captured);
        }
    } else if fast::handles(op)
        && let Some((local, remote)) = ipv4_ends(&ctx)
    {
        if op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
            // Whatever this agent's setting: the callback only comes for
            // sockets put on the fast path (by this or an earlier agent).
            fast::on_state_change(&ctx, local, remote);
        } else if fast::enabled() {
            fast::on_established(&ctx, local, remote, false);
        }
    }
    0
}

/// The IPv4 addresses (network order) of both ends, if the connection is
/// IPv4 on the wire: an `AF_INET` socket, or an `AF_INET6` one whose both
/// ends are IPv4-mapped (the addresses are then taken from inside the
/// mapped ones). `None` for real IPv6 connections, never captured.
#[inline(always)]
fn ipv4_ends(ctx: &SockOpsContext) -> Option<(u32, u32)> {
    match ctx.family() {
        AF_INET => Some((ctx.local_ip4(), ctx.remote_ip4())),
        AF_INET6 => {
            let ops = ctx.ops;
            // SAFETY: `ops` is the context pointer; local_ip6/remote_ip6
            // are readable by sock_ops programs.
            let (local, remote) = unsafe {
                (
                    read_ip6(&raw const (*ops).local_ip6),
                    read_ip6(&raw const (*ops).remote_ip6),
                )
            };
            Some((v4_mapped::ip4_of(local)?, v4_mapped::ip4_of(remote)?))
        }
        _ => None,
    }
}

/// Reads an IPv6 address of the context one 4-byte word at a time: the
/// verifier accepts only 4-byte loads of sock_ops fields, and a plain array
/// copy leaves the width to LLVM (which may merge words into 8-byte loads).
///
/// # Safety
/// `field` must point at an IPv6 address field of the sock_ops context.
#[inline(always)]
unsafe fn read_ip6(field: *const [u32; 4]) -> [u32; 4] {
    // SAFETY: per the function's contract.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*field)[0]),
            core::ptr::read_volatile(&raw const (*field)[1]),
            core::ptr::read_volatile(&raw const (*field)[2]),
            core::ptr::read_volatile(&raw const (*field)[3]),
        ]
    }
}

fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the helper takes the program context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Hands a captured socket's original destination over to its 4-tuple;
/// returns whether the socket was captured.
fn on_established(ctx: &SockOpsContext, local_ip4: u32, remote_ip4: u32) -> bool {
    let cookie = cookie(ctx);
    // SAFETY: copied out before the entry is removed.
    let Some(orig) = (unsafe { ORIG_DST.get(cookie) }).copied() else {
        return false;
    };
    // Seen from the client: local = pod, remote = proxy.
    let key = ConnKey {
        client_ip4: local_ip4,
        proxy_ip4: remote_ip4,
        client_port: ctx.local_port() as u16,
        proxy_port: u32::from_be(ctx.remote_port()) as u16,
    };
    if CONNS.insert(key, orig, 0).is_err() {
        count(stats::CONNS_FULL);
        error!(
            ctx,
            "DP_CONNS insert failed for client port {}", key.client_port
        );
    }
    let _ = ORIG_DST.remove(cookie);
    true
}
