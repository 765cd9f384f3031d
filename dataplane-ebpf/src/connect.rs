//! `cgroup/connect4` and `cgroup/connect6`: redirect an enrolled pod's
//! connect to a mesh service towards the node proxy.
//!
//! Both hooks make the same decision ([`capture`]); they differ only in
//! where the address lives in the context. connect6 exists for dual-stack
//! clients: an `AF_INET6` socket (without `IPV6_V6ONLY`, as Java and gRPC
//! open them) dialling an IPv4 service by its mapped address
//! `::ffff:a.b.c.d`. The kernel runs only the connect6 hook for such a
//! socket, never connect4, although the connection on the wire is IPv4;
//! without connect6 these connects would bypass the mesh silently.
//! Services are IPv4 only today, so pure IPv6 destinations are left alone.
//!
//! While no proxy listens (the agent crashed, or stopped with no successor),
//! a captured connect is refused at once (fail-closed) or sent straight to
//! one of the service's endpoints (fail-open), as the agent was told. The
//! proxy's liveness is the kernel's own knowledge: its listening sockets
//! sit in a socket map, which drops a socket the moment it closes.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    cty::c_void,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_prandom_u32, bpf_get_socket_cookie,
        bpf_map_lookup_elem, bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, error};
use dataplane_common::{
    ExportKey, MAX_CGROUP_DEPTH, OrigDst, ServiceKey, ServiceValue, capacity, proxy_down, stats,
    v4_mapped,
};

use crate::maps::{
    DP_PROXY_DOWN, DP_PROXY_IP4, DP_PROXY_MARK, DP_PROXY_PORT, ENROLLED, EXPORTS, ORIG_DST,
    PROXY_LISTENERS, SERVICES, count,
};

/// Let the connect proceed (possibly rewritten).
const ALLOW: i32 = 1;
/// Fail the connect with EPERM.
const REJECT: i32 = 0;
const IPPROTO_TCP: u32 = 6;

/// What to do with one connect.
enum Decision {
    /// Not ours: leave the destination as it is.
    Leave,
    /// Send it to this address (network order) and port (host order):
    /// the proxy (original destination stored), or, failing open, an
    /// endpoint of the service.
    Redirect { ip4: u32, port: u16 },
    /// Captured, but the original destination could not be stored, or no
    /// proxy listens and the policy is to fail closed.
    Refuse,
}

#[cgroup_sock_addr(connect4)]
pub fn dp_connect4(ctx: SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: `addr` is the context pointer the kernel passed in; user_ip4
    // and user_port are readable by connect4 programs.
    let (ip4, port_be) = unsafe { ((*addr).user_ip4, (*addr).user_port) };
    match capture(&ctx, ip4, port_be) {
        Decision::Leave => ALLOW,
        Decision::Refuse => REJECT,
        Decision::Redirect { ip4: to_ip4, port } => {
            // SAFETY: writes to user_ip4/user_port are allowed in connect4.
            // Each is a separate volatile store so LLVM cannot merge them
            // into one wide store, which the verifier rejects on context
            // fields.
            unsafe {
                core::ptr::write_volatile(&raw mut (*addr).user_ip4, to_ip4);
                write_port(addr, port);
            }
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn dp_connect6(ctx: SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: `addr` is the context pointer the kernel passed in; user_ip6
    // and user_port are readable by connect6 programs.
    let (ip6, port_be) = unsafe { (read_ip6(addr), (*addr).user_port) };
    // Only IPv4 services exist: a pure IPv6 destination is never a service.
    let Some(ip4) = v4_mapped::ip4_of(ip6) else {
        return ALLOW;
    };
    match capture(&ctx, ip4, port_be) {
        Decision::Leave => ALLOW,
        Decision::Refuse => REJECT,
        Decision::Redirect { ip4: to_ip4, port } => {
            // The destination stays a mapped address, `::ffff:<proxy>`, so
            // the kernel carries on exactly as for the original one (it
            // connects over IPv4) and the proxy's accepted socket is IPv4.
            // The first three words already hold the `::ffff:` prefix:
            // only the IPv4 word changes.
            // SAFETY: 4-byte writes to user_ip6[i] and user_port are
            // allowed in connect6; volatile keeps them separate (see
            // dp_connect4).
            unsafe {
                core::ptr::write_volatile(&raw mut (*addr).user_ip6[3], to_ip4);
                write_port(addr, port);
            }
            ALLOW
        }
    }
}

/// Reads `user_ip6` one 4-byte word at a time: the verifier accepts only
/// 4-byte (or aligned 8-byte) loads of it, and a plain array copy leaves the
/// width to LLVM.
///
/// # Safety
/// `addr` must be the context of a connect6 program.
#[inline(always)]
unsafe fn read_ip6(addr: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: per the function's contract.
    unsafe {
        let ip6 = &raw const (*addr).user_ip6;
        [
            core::ptr::read_volatile(&raw const (*ip6)[0]),
            core::ptr::read_volatile(&raw const (*ip6)[1]),
            core::ptr::read_volatile(&raw const (*ip6)[2]),
            core::ptr::read_volatile(&raw const (*ip6)[3]),
        ]
    }
}

/// Sets the destination port (host order in, network order in the u32
/// field, as the kernel expects).
///
/// # Safety
/// `addr` must be the context of a connect4 or connect6 program.
#[inline(always)]
unsafe fn write_port(addr: *mut bpf_sock_addr, port: u16) {
    // SAFETY: per the function's contract; user_port is writable there.
    unsafe { core::ptr::write_volatile(&raw mut (*addr).user_port, u32::from(port.to_be())) };
}

/// The decision shared by connect4 and connect6, for a destination
/// `ip4` (network order) and `port_be` (network order, as in `user_port`):
/// redirect TCP connects of enrolled pods to mesh services, except the
/// proxy's own; store the original destination under the socket cookie
/// first (refusing the connect if that is impossible) and count.
#[inline(always)]
fn capture(ctx: &SockAddrContext, ip4: u32, port_be: u32) -> Decision {
    let addr = ctx.sock_addr;
    // SAFETY: `addr` is the context pointer; protocol and sk are readable
    // by both connect hooks.
    let (protocol, sk) = unsafe { ((*addr).protocol, (*addr).__bindgen_anon_1.sk) };
    if protocol != IPPROTO_TCP {
        return Decision::Leave;
    }
    // The proxy marks its own sockets: never send the proxy to itself.
    let mark = DP_PROXY_MARK.load();
    // SAFETY: `sk` is always set for sock_addr programs.
    if mark != 0 && !sk.is_null() && unsafe { (*sk).mark } == mark {
        return Decision::Leave;
    }
    let service = ServiceKey {
        ip4,
        port: u16::from_be(port_be as u16),
        _pad: 0,
    };
    // Read in place: the verifier allows a bounded variable index into map
    // memory (the endpoint pick), not into a copy on the stack.
    // SAFETY: a map value pointer, valid for this program run.
    let Some(value) = SERVICES.get_ptr(service).map(|p| unsafe { &*p }) else {
        return Decision::Leave;
    };
    let Some(tenant) = caller_tenant() else {
        return Decision::Leave;
    };
    if !tenant_may_call(value, tenant, ip4, service.port) {
        // A pod of another tenant than the service's, which the service is
        // not exported to: the connect fails now (EPERM), whatever the
        // state of the proxy (which checks again).
        count(stats::TENANT_DENIED);
        debug!(ctx, "tenant {} may not call port {}", tenant, service.port);
        return Decision::Refuse;
    }
    if !proxy_listening() {
        return when_proxy_down(ctx, value, service.port);
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
        return Decision::Refuse;
    }
    // One counter for both hooks: a captured connection is a captured
    // connection, whichever socket family the client happened to open.
    count(stats::CAPTURED);
    debug!(
        ctx,
        "captured connect to port {} (cookie {})", service.port, cookie
    );
    Decision::Redirect {
        ip4: DP_PROXY_IP4.load(),
        port: DP_PROXY_PORT.load(),
    }
}

/// Whether any agent's proxy listening socket is in the socket map.
#[inline(always)]
fn proxy_listening() -> bool {
    let map = (&raw const PROXY_LISTENERS).cast_mut().cast::<c_void>();
    let mut slot: u32 = 0;
    while slot < capacity::PROXY_LISTENERS {
        // SAFETY: a lookup in a socket map returns a referenced socket or
        // null; the reference is released at once.
        let sk = unsafe { bpf_map_lookup_elem(map, (&raw const slot).cast()) };
        if !sk.is_null() {
            // SAFETY: `sk` came from the lookup above.
            unsafe { bpf_sk_release(sk) };
            return true;
        }
        slot += 1;
    }
    false
}

/// A captured connect while no proxy listens: refused (fail-closed), or
/// sent to a random endpoint of the service (fail-open; refused too when
/// the service has none).
#[inline(always)]
fn when_proxy_down(ctx: &SockAddrContext, value: &ServiceValue, port: u16) -> Decision {
    let count_set = (value.count as usize).min(capacity::FALLBACK_ENDPOINTS);
    if DP_PROXY_DOWN.load() == proxy_down::FAIL_OPEN && count_set > 0 {
        // SAFETY: plain helper call.
        let random = unsafe { bpf_get_prandom_u32() } as usize;
        // The verifier loses the bounds of a modulo by a variable, and wants
        // them before an index into map memory; the mask restores them. It
        // changes nothing (the pick is below `count_set` <= the array's
        // length, a power of two), so LLVM would drop it: the volatile read
        // hides the value from LLVM.
        let pick = random % count_set;
        // SAFETY: a read of a local.
        let pick = unsafe { core::ptr::read_volatile(&raw const pick) }
            & (capacity::FALLBACK_ENDPOINTS - 1);
        if let Some(endpoint) = value.endpoints.get(pick) {
            count(stats::PROXY_DOWN_DIRECT);
            debug!(
                ctx,
                "no proxy listening: connect to port {} sent direct", port
            );
            return Decision::Redirect {
                ip4: endpoint.ip4,
                port: endpoint.port,
            };
        }
    }
    count(stats::PROXY_DOWN_REFUSED);
    debug!(ctx, "no proxy listening: connect to port {} refused", port);
    Decision::Refuse
}

/// The tenant of the calling task's pod (0: none) if its cgroup, or one of
/// its ancestors, is enrolled; `None` if not enrolled.
///
/// Pods are enrolled by their pod-level cgroup, but their processes live in
/// container cgroups below it, at a depth that depends on the cgroup driver;
/// so walk the ancestry instead of assuming a layout.
#[inline(always)]
fn caller_tenant() -> Option<u32> {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: plain helper call; returns 0 past the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return None;
        }
        // SAFETY: a map value read at once, valid for this program run.
        if let Some(pod) = unsafe { ENROLLED.get(id) } {
            return Some(pod.tenant);
        }
        level += 1;
    }
    None
}

/// Tenant isolation: a service without a tenant is everyone's; a tenant's
/// service is its own pods', and the other tenants' it is exported to.
#[inline(always)]
fn tenant_may_call(service: &ServiceValue, tenant: u32, ip4: u32, port: u16) -> bool {
    if service.tenant == 0 || service.tenant == tenant {
        return true;
    }
    let key = ExportKey {
        ip4,
        port,
        _pad: 0,
        tenant,
    };
    // SAFETY: the value is only tested for presence.
    unsafe { EXPORTS.get(key) }.is_some()
}
