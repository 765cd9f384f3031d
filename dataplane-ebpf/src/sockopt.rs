//! `cgroup/getsockopt` on the proxy's cgroup: answer `SO_ORIGINAL_DST` for
//! connections that `connect4` or `connect6` redirected, exactly as
//! netfilter answers it behind an iptables REDIRECT, so the proxy has one
//! code path for both. The accepted socket is always IPv4: a dual-stack
//! client's connection to the mapped proxy address is IPv4 on the wire.

use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use dataplane_common::{ConnKey, SO_ORIGINAL_DST, SOL_IP, stats};

use crate::maps::{CONNS, count};

/// Always let the syscall complete; we only fill in the answer.
const PROCEED: i32 = 1;
const AF_INET: u16 = 2;

/// `struct sockaddr_in`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr: u32,
    zero: [u8; 8],
}

#[cgroup_sockopt(getsockopt)]
pub fn dp_getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: `ctx.sockopt` is the context pointer; every field read or
    // written is one cgroup/getsockopt programs may access, and `optval`
    // is bounds-checked against `optval_end` before the store.
    unsafe { answer_original_dst(&ctx) };
    PROCEED
}

unsafe fn answer_original_dst(ctx: &SockoptContext) {
    let opt = ctx.sockopt;
    let (level, optname) = unsafe { ((*opt).level, (*opt).optname) };
    if level != SOL_IP || optname != SO_ORIGINAL_DST {
        return;
    }
    let sk = unsafe { (*opt).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // Seen from the proxy: src = proxy, dst = client.
    let key = unsafe {
        ConnKey {
            client_ip4: (*sk).dst_ip4,
            proxy_ip4: (*sk).src_ip4,
            client_port: u16::from_be((*sk).dst_port),
            proxy_port: (*sk).src_port as u16,
        }
    };
    let Some(orig) = (unsafe { CONNS.get(key) }).copied() else {
        count(stats::ORIG_DST_UNKNOWN);
        return;
    };
    let optval = unsafe { (*opt).__bindgen_anon_2.optval } as *mut SockaddrIn;
    let optval_end = unsafe { (*opt).__bindgen_anon_3.optval_end } as *mut u8;
    if optval.is_null() || unsafe { (optval as *mut u8).add(size_of::<SockaddrIn>()) } > optval_end
    {
        return;
    }
    let answer = SockaddrIn {
        family: AF_INET,
        port_be: orig.port.to_be(),
        addr: orig.ip4,
        zero: [0; 8],
    };
    unsafe {
        core::ptr::write_unaligned(optval, answer);
        core::ptr::write_volatile(&mut (*opt).optlen, size_of::<SockaddrIn>() as i32);
        core::ptr::write_volatile(&mut (*opt).retval, 0);
    }
    // The answer is given once: the entry has done its job.
    let _ = CONNS.remove(key);
    count(stats::ORIG_DST_SERVED);
}
