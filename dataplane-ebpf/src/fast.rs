//! The kernel fast path (`--fast-path on`): data between a pod and the
//! node proxy on the same node skips the TCP/IP stack. sock_ops puts both
//! ends of such connections in `DP_FAST_SOCKS`; `dp_fast_msg` (sk_msg on
//! that map) runs in the sender's `sendmsg` and queues its data straight
//! on the peer socket's receive side.
//!
//! Which sockets: a captured pod socket (its peer is the proxy's accepted
//! socket), the proxy's accepted sockets, the node's own outgoing sockets
//! (the proxy's upstream connections; a peer is found only for pods on
//! this node), and pods' server sockets called from the proxy's address.
//!
//! One path per direction: a sender's first message decides whether its
//! data goes straight to the peer (the peer is on the fast path) or through
//! TCP (it is not yet, e.g. a client that sends before the proxy's end of
//! the handshake completed, or a pod's message starts a bulk stream, see
//! `FAST_BULK_MESSAGE`; the proxy's sockets are exempt), and that
//! decision stays until the socket closes (a spliced direction, below, is
//! a direct one whose data goes one socket further). A receiver reads the fast path's queue before
//! TCP's, so switching a direction from TCP to the fast path could reorder
//! its bytes.
//!
//! Splicing past the proxy: for an opaque TCP connection whose four
//! sockets are all here (pod X → proxy socket `in`, proxy socket `out` →
//! pod Y), the proxy registers each direction in `DP_FAST_SPLICE` and
//! reports in `DP_FAST_FORWARDED` how much of X's data it has written on.
//! At a message of X, once that equals what X has sent straight to `in`
//! (nothing of X's waits in the proxy) and `out`'s data goes socket to
//! socket (it is already in Y's queue, not behind in TCP's), X's data
//! goes straight to Y from then on: Y's queue gets the proxy's bytes, then
//! X's, in order. Until then, and for good if `out` sends through TCP or
//! Y cannot be reached, the proxy relays. Going back to the proxy is
//! always in order (what was spliced is already in Y's queue). End of
//! stream and resets still travel through TCP and the proxy, behind the
//! data. A splice lasts only while the proxy's socket `in` is there: once
//! it closed (the proxy died), X's data goes through TCP again and meets
//! the reset, as without a splice. `target` and `out` are checked by
//! cookie, so a later socket that took over their addresses is not
//! taken for them.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        sk_action::SK_PASS,
    },
    helpers::bpf_get_netns_cookie,
    helpers::bpf_get_socket_cookie,
    macros::sk_msg,
    programs::{SkMsgContext, SockOpsContext},
};
use dataplane_common::{FAST_BULK_MESSAGE, FastKey, FastPath, Splice, fast_path, splice, stats};

use crate::maps::{
    DP_FAST_PATH, DP_PROXY_IP4, DP_PROXY_NETNS, DP_PROXY_PORT, FAST_FORWARDED, FAST_PATHS,
    FAST_SOCKS, FAST_SPLICE, count,
};

/// `TCP_CLOSE` in `enum tcp_state`.
const TCP_CLOSE: u32 = 7;

/// Whether the fast path is on (the agent's `--fast-path`).
#[inline(always)]
pub fn enabled() -> bool {
    DP_FAST_PATH.load() != 0
}

fn key(ctx: &SockOpsContext, local_ip4: u32, remote_ip4: u32) -> FastKey {
    FastKey {
        netns: DP_PROXY_NETNS.load(),
        local_ip4,
        remote_ip4,
        local_port: ctx.local_port(),
        remote_port: u32::from_be(ctx.remote_port()),
    }
}

/// sock_ops, established either way: put the socket on the fast path if it
/// is one of the ends described above. `captured`: connect4/connect6
/// redirected it to the proxy.
pub fn on_established(ctx: &SockOpsContext, local_ip4: u32, remote_ip4: u32, captured: bool) {
    let proxy_netns = DP_PROXY_NETNS.load();
    // SAFETY: the helper takes the program context.
    let own_netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let in_proxy_netns = own_netns == proxy_netns;
    // A pod's socket, or (`other`) the proxy's or the node's.
    let (pod, other) = if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        (captured, in_proxy_netns)
    } else {
        let proxy_listener =
            local_ip4 == DP_PROXY_IP4.load() && ctx.local_port() == u32::from(DP_PROXY_PORT.load());
        let called_by_proxy = !in_proxy_netns && remote_ip4 == DP_PROXY_IP4.load();
        (called_by_proxy, in_proxy_netns && proxy_listener)
    };
    if !pod && !other {
        return;
    }
    let mut key = key(ctx, local_ip4, remote_ip4);
    // Its decision entry first, fresh (a closed socket's with the same
    // addresses may be left, e.g. by an agent that stopped before it
    // closed): every socket on the fast path has one, so deciding never
    // needs an insert that could fail on a full map and leave a direction
    // to be decided again.
    let path = FastPath {
        // SAFETY: the helper takes the program context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        pod: u8::from(pod),
        ..FastPath::default()
    };
    if FAST_PATHS.insert(key, path, u64::from(BPF_ANY)).is_err() {
        count(stats::FAST_FULL);
        return;
    }
    // Nor may a splice registered for a closed socket with the same
    // addresses apply to this one.
    forget_splice(&key);
    // SAFETY: `ops` is the program context, which the helper takes.
    let ops = unsafe { &mut *ctx.ops };
    if FAST_SOCKS
        .update(&mut key, ops, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = FAST_PATHS.remove(key);
        count(stats::FAST_FULL);
        return;
    }
    // Told when it closes, to forget its decision; other programs' flags
    // kept.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
}

/// sock_ops state change of a fast-path socket: on close, forget its
/// decision (the socket leaves `DP_FAST_SOCKS` by itself).
pub fn on_state_change(ctx: &SockOpsContext, local_ip4: u32, remote_ip4: u32) {
    if ctx.op() == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == TCP_CLOSE {
        let _ = FAST_PATHS.remove(key(ctx, local_ip4, remote_ip4));
    }
}

/// Removes a sending socket's splice registration. The proxy removes its
/// own when the connection ends (after reading the entry's count of
/// spliced bytes, so not at the socket's close); this covers an agent that
/// died first, before a new socket with the same addresses uses the entry.
#[inline(always)]
fn forget_splice(key: &FastKey) {
    let _ = FAST_SPLICE.remove(key);
    let _ = FAST_FORWARDED.remove(key);
}

/// Whether `op` is one of the sock_ops callbacks this module handles.
#[inline(always)]
pub fn handles(op: u32) -> bool {
    op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_STATE_CB
}

#[sk_msg]
pub fn dp_fast_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: `msg` is the program context; these fields are readable by
    // sk_msg programs.
    let key = unsafe {
        let msg = ctx.msg;
        FastKey {
            netns: DP_PROXY_NETNS.load(),
            local_ip4: (*msg).local_ip4,
            remote_ip4: (*msg).remote_ip4,
            local_port: (*msg).local_port,
            remote_port: u32::from_be((*msg).remote_port),
        }
    };
    // SAFETY: as above.
    let size = u64::from(unsafe { (*ctx.msg).size });
    let mut peer = key.peer();
    // Every socket here got its entry when it was put on the fast path; a
    // socket without one (not expected) stays on TCP.
    let Some(path) = FAST_PATHS.get_ptr_mut(key) else {
        return SK_PASS;
    };
    // SAFETY: the pointer comes from the map lookup; sendmsg holds the
    // socket's lock, so no other message of this socket runs this at once.
    let path = unsafe { &mut *path };
    match path.decision {
        fast_path::DIRECT => {
            if spliced(&ctx, &key, &mut peer, path.sent, size) {
                return SK_PASS;
            }
            // A peer that closed has left the map: the data then goes
            // through TCP, which answers a closed socket with a reset.
            if FAST_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS))
                == i64::from(SK_PASS)
            {
                path.sent += size;
            }
        }
        // A pod's bulk stream, at its first message: through TCP (see
        // `FAST_BULK_MESSAGE`), before a byte of it is on the fast path.
        // Not the proxy's sockets: what they send is relayed, and the
        // proxy's socket towards a pod must stay direct for the other
        // direction to be spliced past it.
        fast_path::UNDECIDED if path.pod != 0 && size >= u64::from(FAST_BULK_MESSAGE) => {
            path.decision = fast_path::TCP;
            count(stats::FAST_BULK);
        }
        fast_path::UNDECIDED => {
            let direct = FAST_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS))
                == i64::from(SK_PASS);
            let (decision, counter) = if direct {
                // The peer learns, before the data is queued, that its
                // queue is fed: the proxy splices only sockets that never
                // were (splice does not see that queue).
                if let Some(receiver) = FAST_PATHS.get_ptr_mut(peer) {
                    // SAFETY: the pointer comes from the map lookup; the
                    // peer's own messages write other fields of it.
                    unsafe { (*receiver).fed = 1 };
                }
                // A first message may already go past the proxy (an
                // answer to a request the proxy relayed); the later
                // redirect replaces the one above.
                if !spliced(&ctx, &key, &mut peer, path.sent, size) {
                    path.sent += size;
                }
                (fast_path::DIRECT, stats::FAST_DIRECT)
            } else {
                (fast_path::TCP, stats::FAST_TCP)
            };
            path.decision = decision;
            count(counter);
        }
        _ => {}
    }
    SK_PASS
}

/// Sends the message straight to the far end if its direction is spliced
/// or can be now (see the module's doc); `peer`: the proxy's socket the
/// sender is connected to; `sent`: what the sender has sent to the proxy
/// so far. Returns whether it did.
#[inline(always)]
fn spliced(ctx: &SkMsgContext, key: &FastKey, peer: &mut FastKey, sent: u64, size: u64) -> bool {
    let Some(entry) = FAST_SPLICE.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: the pointer comes from the map lookup; only this socket's
    // messages (serialized by its lock) change the entry's state and count.
    let entry = unsafe { &mut *entry };
    if entry.state == splice::PENDING {
        let state = decide(entry, key, sent);
        if state != splice::PENDING {
            entry.state = state;
            // The proxy stops reporting once its report is gone.
            let _ = FAST_FORWARDED.remove(key);
            if state == splice::SPLICED {
                count(stats::FAST_SPLICED);
            }
        }
    }
    if entry.state != splice::SPLICED {
        return false;
    }
    // The proxy's end still there (a redirect to it found it; the one to
    // the target replaces it), and the target the socket registered.
    let pass = i64::from(SK_PASS);
    if is_socket(&entry.target, entry.target_cookie)
        && FAST_SOCKS.redirect_msg(ctx, peer, u64::from(BPF_F_INGRESS)) == pass
        && FAST_SOCKS.redirect_msg(ctx, &mut entry.target, u64::from(BPF_F_INGRESS)) == pass
    {
        entry.bytes += size;
        return true;
    }
    // The far end or the proxy closed: through the proxy again (what was
    // spliced is already in the far end's queue, so the order holds), which
    // tells the sender.
    entry.state = splice::NEVER;
    false
}

/// Whether the fast-path socket at `key` is the one with `cookie`.
#[inline(always)]
fn is_socket(key: &FastKey, cookie: u64) -> bool {
    // SAFETY: a plain read of a map value.
    unsafe { FAST_PATHS.get(key) }.is_some_and(|path| path.cookie == cookie)
}

/// Whether a pending direction can be spliced now.
#[inline(always)]
fn decide(entry: &Splice, key: &FastKey, sent: u64) -> u32 {
    // SAFETY: plain reads of map values.
    let Some(forwarded) = (unsafe { FAST_FORWARDED.get(key) }).copied() else {
        return splice::PENDING;
    };
    let Some(out) = (unsafe { FAST_PATHS.get(entry.out) }).copied() else {
        return splice::NEVER;
    };
    if out.cookie != entry.out_cookie {
        return splice::NEVER;
    }
    match out.decision {
        // The proxy's writes went socket to socket: in the far end's queue.
        fast_path::DIRECT if forwarded == sent => splice::SPLICED,
        fast_path::DIRECT => splice::PENDING,
        // Nothing written on yet, and nothing of the sender's waiting.
        fast_path::UNDECIDED if forwarded == 0 && sent == 0 => splice::SPLICED,
        fast_path::UNDECIDED => splice::PENDING,
        // Its writes went through TCP: the far end reads them after its
        // fast-path queue, so splicing would reorder.
        _ => splice::NEVER,
    }
}
