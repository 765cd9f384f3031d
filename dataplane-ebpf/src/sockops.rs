//! `sock_ops`: hand the original destination from the connecting socket's
//! cookie over to the connection's 4-tuple, which the proxy can compute
//! from the socket it accepts. Connects that never establish are cleaned
//! up by `sock_release`.

use aya_ebpf::{
    EbpfContext as _, bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, helpers::bpf_get_socket_cookie,
    macros::sock_ops, programs::SockOpsContext,
};
use aya_log_ebpf::error;
use dataplane_common::{ConnKey, stats};

use crate::maps::{CONNS, ORIG_DST, count};

const AF_INET: u32 = 2;

#[sock_ops]
pub fn dp_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.family() == AF_INET && ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        on_established(&ctx);
    }
    0
}

fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the helper takes the program context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

fn on_established(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    // SAFETY: copied out before the entry is removed.
    let Some(orig) = (unsafe { ORIG_DST.get(cookie) }).copied() else {
        return;
    };
    // Seen from the client: local = pod, remote = proxy.
    let key = ConnKey {
        client_ip4: ctx.local_ip4(),
        proxy_ip4: ctx.remote_ip4(),
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
}
