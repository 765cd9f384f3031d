//! `sock_ops`: hand the original destination from the connecting socket's
//! cookie over to the connection's 4-tuple, which the proxy can compute
//! from the socket it accepts.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::error;
use dataplane_common::{ConnKey, stats};

use crate::maps::{CONNS, ORIG_DST, count};

const AF_INET: u32 = 2;

#[sock_ops]
pub fn dp_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.family() == AF_INET {
        match ctx.op() {
            BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
            BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
            _ => {}
        }
    }
    0
}

fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the helper takes the program context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// A captured socket asks to hear about its state changes, so that a
/// connect that never establishes still frees its `DP_ORIG_DST` entry.
fn on_connect(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    // SAFETY: the value is only tested for presence.
    if unsafe { ORIG_DST.get(cookie) }.is_some() {
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
        let _ = ctx.set_cb_flags(flags as i32);
    }
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

fn on_state_change(ctx: &SockOpsContext) {
    // args[1] is the new TCP state.
    if ctx.arg(1) == BPF_TCP_CLOSE {
        let _ = ORIG_DST.remove(cookie(ctx));
    }
}
