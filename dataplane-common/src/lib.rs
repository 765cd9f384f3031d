//! Types and constants shared by the kernel side (`dataplane-ebpf`) and the
//! node agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding because the same
//! bytes are read by the verifier-checked eBPF code and by user space through
//! the bpf(2) syscall; a layout drift would silently corrupt map entries.
//!
//! Byte order conventions (chosen to match what each side reads cheaply):
//! IPv4 addresses are stored exactly as the kernel hands them over
//! (`user_ip4`, `src_ip4`...: network order in a `u32`, so user space uses
//! `u32::from_ne_bytes(addr.octets())`); ports are stored in host order.

// Outside input must never panic the agent: product code handles errors
// instead of unwrapping them (tests may unwrap; see clippy.toml).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![deny(clippy::dbg_macro, clippy::todo, clippy::unimplemented)]
#![no_std]

use core::mem::size_of;

/// Names of the maps, as declared in the eBPF object and pinned in bpffs.
pub mod maps {
    /// `HashMap<u64, EnrolledPod>`: cgroup v2 id of an enrolled pod -> its
    /// tenant.
    pub const ENROLLED: &str = "DP_ENROLLED";
    /// `HashMap<ServiceKey, ServiceValue>`: the mesh services (VIP:port).
    pub const SERVICES: &str = "DP_SERVICES";
    /// `HashMap<u64, OrigDst>`: socket cookie -> original destination, from
    /// `connect()` until the connection is established (or fails).
    pub const ORIG_DST: &str = "DP_ORIG_DST";
    /// `LruHashMap<ConnKey, OrigDst>`: connection 4-tuple -> original
    /// destination, from establishment until the proxy asked for it.
    pub const CONNS: &str = "DP_CONNS";
    /// `PerCpuArray<u64>` of counters, indexed by [`crate::stats`].
    pub const STATS: &str = "DP_STATS";
    /// `SockMap`: the node proxy's listening sockets, one slot per agent
    /// process (two during a restart). The kernel removes a socket from it
    /// when the socket closes, so an empty map means no proxy is listening,
    /// whatever happened to the agent; the connect hooks then apply the
    /// `PROXY_DOWN` policy.
    pub const PROXY_LISTENERS: &str = "DP_PROXY_LISTENERS";
    /// `SockHash<FastKey>`: the kernel fast path's sockets (the ends of
    /// connections to and from the node proxy on this node); the kernel
    /// removes a socket when it closes.
    pub const FAST_SOCKS: &str = "DP_FAST_SOCKS";
    /// `HashMap<FastKey, Splice>`: directions the proxy asked the
    /// kernel to splice past it (see [`crate::Splice`]).
    pub const FAST_SPLICE: &str = "DP_FAST_SPLICE";
    /// `HashMap<FastKey, u64>`: per direction of `FAST_SPLICE`, the bytes
    /// the proxy has written on; the programs delete it once the direction
    /// is decided, which tells the proxy to stop reporting.
    pub const FAST_FORWARDED: &str = "DP_FAST_FORWARDED";
    /// `HashMap<FastKey, FastPath>`: for each sending socket of `FAST_SOCKS`,
    /// whether its data goes straight to the peer socket or through TCP,
    /// decided at its first message and kept until it is released (one
    /// path per direction, so the receiver never gets bytes out of order).
    pub const FAST_PATHS: &str = "DP_FAST_PATHS";
    /// `HashMap<ExportKey, u8>`: which other tenants may call a tenant's
    /// service (one entry per service and tenant it is exported to).
    pub const EXPORTS: &str = "DP_EXPORTS";
}

/// Map capacities. The agent reports an insert that fails because a map is
/// full; these sizes bound the kernel memory the data plane may use.
pub mod capacity {
    /// Pods on one node that can be enrolled at once.
    pub const ENROLLED: u32 = 4096;
    /// Distinct service VIP:port pairs.
    pub const SERVICES: u32 = 16384;
    /// Connections between `connect()` and establishment, node-wide.
    pub const ORIG_DST: u32 = 65536;
    /// Established connections not yet picked up by the proxy.
    pub const CONNS: u32 = 65536;
    /// Agent processes listening at once (a restart has two).
    pub const PROXY_LISTENERS: u32 = 4;
    /// Endpoints per service kept for fail-open (connects go straight to
    /// one of them while no proxy listens).
    pub const FALLBACK_ENDPOINTS: usize = 8;
    /// Sockets on the kernel fast path (two per connection end pair).
    pub const FAST_SOCKS: u32 = 65536;
    /// Service ports exported to other tenants, one entry per tenant.
    pub const EXPORTS: u32 = 16384;
    /// Directions of relayed connections registered for splicing past
    /// the proxy (two per connection). Allocated as used; when full, new
    /// connections are relayed as without a splice.
    pub const FAST_SPLICE: u32 = 16384;
}

/// Names of the global variables the agent sets when it loads the programs.
pub mod globals {
    /// `u32`, network order: the address the node proxy listens on.
    pub const PROXY_IP4: &str = "DP_PROXY_IP4";
    /// `u16`, host order: the port the node proxy listens on.
    pub const PROXY_PORT: &str = "DP_PROXY_PORT";
    /// `u32`: `SO_MARK` the proxy puts on its own upstream sockets. Marked
    /// sockets are never redirected, so the proxy can never loop to itself.
    pub const PROXY_MARK: &str = "DP_PROXY_MARK";
    /// `u32`: what a captured connect does while no proxy listens:
    /// [`crate::proxy_down::FAIL_CLOSED`] or [`crate::proxy_down::FAIL_OPEN`].
    pub const PROXY_DOWN: &str = "DP_PROXY_DOWN";
    /// `u32`: 1 when the kernel fast path is on (sock_ops puts sockets in
    /// `FAST_SOCKS`), 0 otherwise.
    pub const FAST_PATH: &str = "DP_FAST_PATH";
    /// `u64`: the network namespace cookie of the node proxy, the frame
    /// every `FastKey` is written in.
    pub const PROXY_NETNS: &str = "DP_PROXY_NETNS";
}

/// Indexes into the `DP_STATS` per-CPU counter array.
pub mod stats {
    /// Connections redirected to the node proxy by `connect4`, or by
    /// `connect6` for dual-stack sockets (one counter: a capture is a
    /// capture, whichever socket family the client opened).
    pub const CAPTURED: u32 = 0;
    /// Connects refused because `DP_ORIG_DST` was full.
    pub const ORIG_DST_FULL: u32 = 1;
    /// Established redirected connections whose 4-tuple could not be stored.
    pub const CONNS_FULL: u32 = 2;
    /// `SO_ORIGINAL_DST` answers given to the proxy.
    pub const ORIG_DST_SERVED: u32 = 3;
    /// `SO_ORIGINAL_DST` asked for a connection the maps did not know.
    pub const ORIG_DST_UNKNOWN: u32 = 4;
    /// Captured connects refused because no proxy listened (fail-closed,
    /// or fail-open for a service without endpoints).
    pub const PROXY_DOWN_REFUSED: u32 = 5;
    /// Captured connects sent straight to an endpoint because no proxy
    /// listened (fail-open).
    pub const PROXY_DOWN_DIRECT: u32 = 6;
    /// Sending directions of fast-path sockets whose data goes straight
    /// to the peer socket.
    pub const FAST_DIRECT: u32 = 7;
    /// Sending directions of fast-path sockets whose peer was not on the
    /// fast path at their first message: their data goes through TCP.
    pub const FAST_TCP: u32 = 8;
    /// Sockets left off the fast path because `DP_FAST_SOCKS` or
    /// `DP_FAST_PATHS` was full (their connections use TCP).
    pub const FAST_FULL: u32 = 9;
    /// Captured connects refused because the calling pod's tenant may not
    /// call the service (not its own, not exported to it).
    pub const TENANT_DENIED: u32 = 10;
    /// Sending directions whose data the kernel now hands straight to the
    /// far end's socket, past the proxy (see `FAST_SPLICE`).
    pub const FAST_SPLICED: u32 = 11;
    /// Sending directions of fast-path sockets whose first message was a
    /// bulk stream's (at least [`super::FAST_BULK_MESSAGE`] bytes): their
    /// data goes through TCP.
    pub const FAST_BULK: u32 = 12;
    /// Number of counters.
    pub const COUNT: u32 = 13;
}

/// Values of the `PROXY_DOWN` global.
pub mod proxy_down {
    /// Refuse the connect at once (`EPERM`): nothing bypasses the proxy.
    pub const FAIL_CLOSED: u32 = 0;
    /// Connect straight to one of the service's endpoints, without the
    /// proxy's policies, until a proxy listens again.
    pub const FAIL_OPEN: u32 = 1;
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`, as in `<linux/netfilter_ipv4.h>`.
pub const SO_ORIGINAL_DST: i32 = 80;
/// `SOL_IP` / `IPPROTO_IP`.
pub const SOL_IP: i32 = 0;
/// How deep in the cgroup tree the connect hooks look for an enrolled
/// ancestor.
/// Kubelet nests pods at most ~5 levels below the root (systemd driver).
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, RFC 4291 2.5.5.2), as
/// the kernel hands IPv6 addresses to eBPF programs: four `u32` words,
/// each in network order (`bpf_sock_addr.user_ip6`,
/// `bpf_sock_ops.remote_ip6`...).
///
/// A dual-stack client (an `AF_INET6` socket without `IPV6_V6ONLY`, as
/// Java and gRPC open them) reaches an IPv4 service by dialling its mapped
/// address; the connection on the wire is plain IPv4. Only IPv4 services
/// exist, so these are the only IPv6 destinations the data plane captures.
pub mod v4_mapped {
    /// The third word of a mapped address: bytes `00 00 ff ff`.
    const MARKER: u32 = 0x0000_ffff;

    /// Whether `ip6` is `::ffff:a.b.c.d`.
    #[inline(always)]
    pub const fn is_mapped(ip6: [u32; 4]) -> bool {
        ip6[0] == 0 && ip6[1] == 0 && u32::from_be(ip6[2]) == MARKER
    }

    /// The IPv4 address inside a mapped address (network order, as in
    /// `user_ip4`), or `None` for any other IPv6 address.
    #[inline(always)]
    pub const fn ip4_of(ip6: [u32; 4]) -> Option<u32> {
        if is_mapped(ip6) { Some(ip6[3]) } else { None }
    }

    /// `::ffff:<ip4>` for an IPv4 address in network order.
    #[inline(always)]
    pub const fn from_ip4(ip4: u32) -> [u32; 4] {
        [0, 0, MARKER.to_be(), ip4]
    }
}

/// Value of `DP_ENROLLED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The pod's tenant (a hash of its name, see the agent's `tenant_id`);
    /// 0: none.
    pub tenant: u32,
}
const _: () = assert!(size_of::<EnrolledPod>() == 4);

/// Key of `DP_SERVICES`: a service virtual IP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Network order, as in `bpf_sock_addr.user_ip4`.
    pub ip4: u32,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<ServiceKey>() == 8);

/// Value of `DP_SERVICES`: the service's endpoints for fail-open (the
/// first [`capacity::FALLBACK_ENDPOINTS`]), and room for flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// The tenant owning the service; 0: none, callable by every enrolled
    /// pod. Other tenants may call it only through `DP_EXPORTS`.
    pub tenant: u32,
    /// How many of `endpoints` are set.
    pub count: u32,
    pub endpoints: [Endpoint; capacity::FALLBACK_ENDPOINTS],
}
const _: () = assert!(size_of::<ServiceValue>() == 72);
const _: () = assert!(capacity::FALLBACK_ENDPOINTS.is_power_of_two());

/// Key of `DP_EXPORTS`: a tenant's service (VIP and port) and a tenant it
/// is exported to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExportKey {
    /// Network order.
    pub ip4: u32,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
    pub tenant: u32,
}
const _: () = assert!(size_of::<ExportKey>() == 12);

/// One endpoint of a service, as the connect hooks write it into a
/// rewritten connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Network order.
    pub ip4: u32,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<Endpoint>() == 8);

/// The destination a pod asked for before `connect4` (or `connect6`, for an
/// IPv4-mapped destination) rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network order.
    pub ip4: u32,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<OrigDst>() == 8);

/// A redirected connection as the proxy's listening socket sees it.
///
/// The full 4-tuple, not just the client port: two pods may reuse the same
/// ephemeral port (or, with overlapping pod networks, even the same address),
/// but TCP guarantees that no two live connections to the proxy share all
/// four values, so entries can never collide.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Network order.
    pub client_ip4: u32,
    /// Network order.
    pub proxy_ip4: u32,
    /// Host order.
    pub client_port: u16,
    /// Host order.
    pub proxy_port: u16,
}
const _: () = assert!(size_of::<ConnKey>() == 12);

/// Key of a socket on the kernel fast path: its connection's addresses as
/// the socket sees them, in the frame of the node proxy's network
/// namespace (`netns` is always the proxy's cookie). Every socket on the
/// fast path is one end of a connection whose other end is the proxy, or a
/// pod's server socket whose peer is the proxy's upstream socket; the
/// proxy's namespace holds at most one live connection per 4-tuple, so
/// equal pod addresses in different namespaces cannot collide. A sender
/// finds its peer by swapping local and remote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FastKey {
    pub netns: u64,
    /// Network order.
    pub local_ip4: u32,
    /// Network order.
    pub remote_ip4: u32,
    /// Host order.
    pub local_port: u32,
    /// Host order.
    pub remote_port: u32,
}
const _: () = assert!(size_of::<FastKey>() == 24);

impl FastKey {
    /// The key of the socket at the other end of the connection.
    #[inline(always)]
    pub const fn peer(&self) -> FastKey {
        FastKey {
            netns: self.netns,
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Value of `DP_FAST_PATHS`: a sending socket's path, and what it sent
/// straight to its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPath {
    /// Bytes sent straight to the peer socket (not those spliced past it).
    pub sent: u64,
    /// The socket's cookie: tells this socket from a later one with the
    /// same addresses.
    pub cookie: u64,
    /// One of [`fast_path`].
    pub decision: u8,
    /// 1 for a pod's socket (captured, or a pod's server socket called by
    /// the proxy), 0 for the proxy's own and the node's: only a pod's
    /// first message can start a bulk stream (see [`FAST_BULK_MESSAGE`]).
    pub pod: u8,
    /// 1 once a peer's first message decided to send straight to this
    /// socket (set before that data is queued): whether anything was ever
    /// queued on it socket to socket, even by a peer that has closed since.
    pub fed: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<FastPath>() == 24);

/// Value of `DP_FAST_SPLICE`, keyed by a sending socket `X` (a pod's socket)
/// whose peer is one of the proxy's sockets: the proxy relays X's bytes
/// from that socket to `out`, its socket towards `target` (the other
/// pod's socket). Once the proxy has written on everything X sent
/// (`DP_FAST_FORWARDED[X]` equals X's `FastPath::sent`) and `out`'s own
/// data goes socket to socket, X's next messages go straight to
/// `target`: the proxy's writes are already in `target`'s queue, so the
/// order holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Splice {
    pub target: FastKey,
    pub out: FastKey,
    /// The cookies of `target` and `out` when registered: a socket that
    /// took over their addresses since is not theirs.
    pub target_cookie: u64,
    pub out_cookie: u64,
    /// Bytes sent straight to `target` since.
    pub bytes: u64,
    /// One of [`splice`].
    pub state: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Splice>() == 80);

/// Values of [`Splice::state`].
pub mod splice {
    /// Registered by the proxy; the program checks at each message.
    pub const PENDING: u32 = 0;
    /// X's data goes straight to the target.
    pub const SPLICED: u32 = 1;
    /// Not possible for this connection (`out` sends through TCP, or the
    /// target left): the proxy relays, as without a splice.
    pub const NEVER: u32 = 2;
}

/// A fast-path direction whose first message is at least this large is
/// taken for a bulk stream and sent through TCP for its whole life. On the
/// fast path nothing slows a sender down (the kernel queues whatever it
/// sends on the peer's receive side, without a limit), so a stream that
/// never pauses outruns the proxy, which copies it twice, and is slower
/// than through TCP, where the window paces it and the proxy moves it with
/// `splice(2)`. 32 KiB: twice the largest first message of the request
/// and response traffic the fast path is for (a request, an RPC, a page
/// of rows), well under what bulk writers hand to one `write` (64 KiB to
/// 1 MiB). Applies to pods' sockets only ([`FastPath::pod`]): what the
/// proxy sends is relayed, and its socket towards a pod stays direct so
/// that the other direction can be spliced past it.
pub const FAST_BULK_MESSAGE: u32 = 32 * 1024;

/// Values of [`FastPath::decision`].
pub mod fast_path {
    /// Put on the fast path, nothing sent yet.
    pub const UNDECIDED: u8 = 0;
    /// The direction's data goes straight to the peer socket.
    pub const DIRECT: u8 = 1;
    /// The direction's data goes through TCP.
    pub const TCP: u8 = 2;
}

#[cfg(test)]
mod tests {
    use super::v4_mapped;

    /// An address as the kernel stores it: 16 bytes, read as four `u32`s.
    fn words(bytes: [u8; 16]) -> [u32; 4] {
        let mut out = [0u32; 4];
        for (word, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        out
    }

    fn ip4(octets: [u8; 4]) -> u32 {
        u32::from_ne_bytes(octets)
    }

    #[test]
    fn mapped_addresses_are_recognised_and_unwrapped() {
        // ::ffff:198.19.0.10
        let mapped = words([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 19, 0, 10]);
        assert!(v4_mapped::is_mapped(mapped));
        assert_eq!(v4_mapped::ip4_of(mapped), Some(ip4([198, 19, 0, 10])));
        assert_eq!(v4_mapped::from_ip4(ip4([198, 19, 0, 10])), mapped);
    }

    #[test]
    fn other_ipv6_addresses_are_not_mapped() {
        let cases = [
            // ::1
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            // ::198.19.0.10 (the deprecated "IPv4-compatible" form)
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 198, 19, 0, 10],
            // 64:ff9b::198.19.0.10 (NAT64)
            [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0, 198, 19, 0, 10],
            // ::ffff:0:198.19.0.10 (SIIT "IPv4-translated")
            [0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 198, 19, 0, 10],
            // fd00::ffff:c613:a
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 19, 0, 10],
        ];
        for bytes in cases {
            assert_eq!(v4_mapped::ip4_of(words(bytes)), None, "{bytes:?}");
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::{
        ConnKey, EnrolledPod, ExportKey, FastKey, FastPath, OrigDst, ServiceKey, ServiceValue,
        Splice,
    };

    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made of integers only,
    // with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for EnrolledPod {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for FastKey {}
    unsafe impl aya::Pod for ExportKey {}
    unsafe impl aya::Pod for FastPath {}
    unsafe impl aya::Pod for Splice {}
}
