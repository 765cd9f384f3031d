//! `cgroup/connect4`: redirect an enrolled pod's connect to a mesh service
//! towards the node proxy.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, error};
use dataplane_common::{MAX_CGROUP_DEPTH, OrigDst, ServiceKey, stats};

use crate::maps::{
    DP_PROXY_IP4, DP_PROXY_MARK, DP_PROXY_PORT, ENROLLED, ORIG_DST, SERVICES, count,
};

/// Let the connect proceed (possibly rewritten).
const ALLOW: i32 = 1;
/// Fail the connect with EPERM.
const REJECT: i32 = 0;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn dp_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let addr = ctx.sock_addr;
    // SAFETY: `addr` is the context pointer the kernel passed in; the fields
    // read and written here are the ones connect4 programs may access.
    let (protocol, ip4, port_be, sk) = unsafe {
        (
            (*addr).protocol,
            (*addr).user_ip4,
            (*addr).user_port,
            (*addr).__bindgen_anon_1.sk,
        )
    };
    if protocol != IPPROTO_TCP {
        return Ok(ALLOW);
    }
    // The proxy marks its own sockets: never send the proxy to itself.
    let mark = DP_PROXY_MARK.load();
    // SAFETY: `sk` is always set for sock_addr programs.
    if mark != 0 && !sk.is_null() && unsafe { (*sk).mark } == mark {
        return Ok(ALLOW);
    }
    let service = ServiceKey {
        ip4,
        port: u16::from_be(port_be as u16),
        _pad: 0,
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { SERVICES.get(service) }.is_none() || !caller_enrolled() {
        return Ok(ALLOW);
    }

    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        ip4,
        port: service.port,
        _pad: 0,
    };
    if ORIG_DST.insert(cookie, orig, 0).is_err() {
        // Without its original destination the proxy could not serve the
        // connection: fail it now, visibly, instead of later and obscurely.
        count(stats::ORIG_DST_FULL);
        error!(
            ctx,
            "DP_ORIG_DST full: refusing connect to port {}", service.port
        );
        return Err(REJECT);
    }

    let proxy_port = DP_PROXY_PORT.load();
    // SAFETY: writes to user_ip4/user_port are allowed in connect4. Each is a
    // separate volatile store so LLVM cannot merge them into one wide store,
    // which the verifier rejects on context fields.
    unsafe {
        core::ptr::write_volatile(&mut (*addr).user_ip4, DP_PROXY_IP4.load());
        core::ptr::write_volatile(&mut (*addr).user_port, u32::from(proxy_port.to_be()));
    }
    count(stats::CAPTURED);
    debug!(
        ctx,
        "captured connect to port {} (cookie {})", service.port, cookie
    );
    Ok(ALLOW)
}

/// Whether the calling task's cgroup, or one of its ancestors, is enrolled.
///
/// Pods are enrolled by their pod-level cgroup, but their processes live in
/// container cgroups below it, at a depth that depends on the cgroup driver;
/// so walk the ancestry instead of assuming a layout.
#[inline(always)]
fn caller_enrolled() -> bool {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: plain helper call; returns 0 past the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        // SAFETY: the value is only tested for presence.
        if unsafe { ENROLLED.get(id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}
