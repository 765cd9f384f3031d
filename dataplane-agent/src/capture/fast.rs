//! The kernel fast path's user-space side (`--fast-path on`): the network
//! namespace cookie the programs key sockets with, and attaching the
//! sk_msg program to its socket map. What the programs do is described in
//! the eBPF crate's `fast` module.

use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd as _, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use aya::Ebpf;
use aya::maps::{HashMap, MapData, SockHash};
use dataplane_common::{FastKey, Splice, fast_path, maps, splice};

use super::CaptureError;

/// `SO_NETNS_COOKIE` (Linux 5.14+), not in every libc crate version.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace this process (the node proxy)
/// runs in, as `bpf_get_netns_cookie` returns it to the programs.
pub fn own_netns_cookie() -> Result<u64, CaptureError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(CaptureError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`, and the
    // socket is open for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(CaptureError::NetnsCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// A handle on the fast path's socket map, for attaching the sk_msg
/// program to it (the program then runs for every socket put there).
pub fn socket_map_fd(ebpf: &Ebpf) -> Result<aya::maps::sock::SockMapFd, CaptureError> {
    let map_err = |message: String| CaptureError::Map {
        name: maps::FAST_SOCKS,
        message,
    };
    let map = ebpf
        .map(maps::FAST_SOCKS)
        .ok_or_else(|| map_err("missing from the eBPF object".into()))?;
    let hash: SockHash<&MapData, FastKey> =
        SockHash::try_from(map).map_err(|err| map_err(err.to_string()))?;
    hash.fd()
        .try_clone()
        .map_err(|err| map_err(err.to_string()))
}

/// `BPF_NOEXIST` / `BPF_EXIST`: insert only a new entry / update only an
/// existing one.
const NOEXIST: u64 = 1;
const EXIST: u64 = 2;

/// The proxy's side of splicing past it (see the eBPF `fast` module): it
/// registers the two directions of an opaque TCP connection whose four
/// sockets are on the fast path, reports how much it has written on, and
/// removes the entries when the connection ends.
pub struct Splicer {
    netns: u64,
    /// Written at registration and removal only; the programs own it
    /// between.
    splices: Mutex<HashMap<MapData, FastKey, Splice>>,
    /// The proxy's reports (the programs remove one once decided).
    forwarded: Mutex<HashMap<MapData, FastKey, u64>>,
    /// Read only: whether a socket is on the fast path, and its sending
    /// direction's path.
    paths: HashMap<MapData, FastKey, dataplane_common::FastPath>,
}

impl Splicer {
    /// Takes the maps from the loaded programs and clears what a previous
    /// agent left registered (removing a registration only sends its data
    /// through a proxy again, in order; an agent still draining relays
    /// its own connections); `netns`: the proxy's namespace cookie, as the
    /// programs key sockets.
    pub fn take_from(ebpf: &mut Ebpf, netns: u64) -> Result<Self, CaptureError> {
        fn take<V: aya::Pod>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<HashMap<MapData, FastKey, V>, CaptureError> {
            let map_err = |message: String| CaptureError::Map { name, message };
            let map = ebpf
                .take_map(name)
                .ok_or_else(|| map_err("missing from the eBPF object".into()))?;
            HashMap::try_from(map).map_err(|err| map_err(err.to_string()))
        }
        fn clear<V: aya::Pod>(map: &mut HashMap<MapData, FastKey, V>) {
            let keys: Vec<FastKey> = map.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = map.remove(&key);
            }
        }
        let mut splices = take(ebpf, maps::FAST_SPLICE)?;
        let mut forwarded = take(ebpf, maps::FAST_FORWARDED)?;
        clear(&mut splices);
        clear(&mut forwarded);
        Ok(Self {
            netns,
            splices: Mutex::new(splices),
            forwarded: Mutex::new(forwarded),
            paths: take(ebpf, maps::FAST_PATHS)?,
        })
    }

    /// The two directions of the connection relayed between the proxy's
    /// sockets `client` (accepted from a pod) and `upstream` (to an
    /// endpoint), registered once one of them has caught up a second time
    /// (see [`Reporter::caught_up`]): a connection that ends at its first
    /// exchange costs no system call here, and by then the endpoint's
    /// socket is on the fast path if it ever will be (a pod on this node).
    ///
    /// # Safety
    /// Both descriptors must stay open while the returned value's
    /// reporters and splice gates are used (the copy that holds them
    /// borrows the streams).
    pub unsafe fn prepare(self: &Arc<Self>, client: RawFd, upstream: RawFd) -> Spliced {
        Spliced(Arc::new(Pair {
            splicer: Arc::clone(self),
            fds: (client, upstream),
            keys: OnceLock::new(),
            caught: [AtomicU64::new(0), AtomicU64::new(0)],
            state: AtomicU8::new(UNREGISTERED),
            inserted: AtomicBool::new(false),
        }))
    }

    /// The keys of a relayed connection's sockets, from the proxy's two.
    fn keys(&self, (client, upstream): (RawFd, RawFd)) -> Option<Keys> {
        let key = |fd: RawFd| -> Option<FastKey> {
            // SAFETY: `prepare`'s contract keeps the descriptor open; the
            // borrow does not outlive this call.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let socket = socket2::SockRef::from(&fd);
            let local = socket.local_addr().ok()?.as_socket()?;
            let remote = socket.peer_addr().ok()?.as_socket()?;
            Some(self.key(local, remote))
        };
        let (client_in, upstream_out) = (key(client)?, key(upstream)?);
        Some(Keys {
            pod: client_in.peer(),
            endpoint: upstream_out.peer(),
            client_in,
            upstream_out,
        })
    }

    fn key(&self, local: SocketAddr, remote: SocketAddr) -> FastKey {
        let (local, remote) = (v4(local), v4(remote));
        FastKey {
            netns: self.netns,
            local_ip4: u32::from_ne_bytes(local.ip().octets()),
            remote_ip4: u32::from_ne_bytes(remote.ip().octets()),
            local_port: u32::from(local.port()),
            remote_port: u32::from(remote.port()),
        }
    }

    /// The cookie of the fast-path socket at `key`, if it is there.
    fn cookie(&self, key: &FastKey) -> Option<u64> {
        self.path(key).ok().flatten().map(|path| path.cookie)
    }

    /// The entry of the fast-path socket at `key`: `None` if it is not on
    /// the fast path (or closed since).
    fn path(
        &self,
        key: &FastKey,
    ) -> Result<Option<dataplane_common::FastPath>, aya::maps::MapError> {
        match self.paths.get(key, 0) {
            Ok(path) => Ok(Some(path)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Reports that everything read from `sender` up to `bytes` is written
    /// on; false once the direction is decided (stop reporting).
    fn report(&self, sender: &FastKey, bytes: u64) -> bool {
        let mut forwarded = self
            .forwarded
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        forwarded.insert(sender, bytes, EXIST).is_ok()
    }

    /// Bytes sent from `sender` straight to the far end.
    fn spliced_bytes(&self, sender: &FastKey) -> u64 {
        let splices = self.splices.lock().unwrap_or_else(PoisonError::into_inner);
        splices.get(sender, 0).map_or(0, |s| s.bytes)
    }

    fn forget(&self, sender: &FastKey) {
        let _ = self
            .forwarded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sender);
        let _ = self
            .splices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sender);
    }
}

/// An IPv4 address as the programs see it (a dual-stack socket's mapped
/// address is its IPv4 one).
fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(v6) => SocketAddrV4::new(
            v6.ip()
                .to_ipv4_mapped()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            v6.port(),
        ),
    }
}

/// Registration states of a [`Pair`].
const UNREGISTERED: u8 = 0;
const REGISTERED: u8 = 1;
const REFUSED: u8 = 2;

/// The two directions of one relayed connection; once registered,
/// removed from the maps when dropped.
pub struct Spliced(Arc<Pair>);

struct Pair {
    splicer: Arc<Splicer>,
    /// The proxy's sockets (client side, upstream side).
    fds: (RawFd, RawFd),
    /// Worked out when first needed (registration, a splice gate).
    keys: OnceLock<Keys>,
    /// What each direction (client → endpoint, then back) last reported
    /// caught up, for the registration of both.
    caught: [AtomicU64; 2],
    state: AtomicU8,
    /// Whether any entry was written (to remove at the end).
    inserted: AtomicBool,
}

struct Keys {
    /// The pod's socket (client → endpoint), and the proxy's socket it
    /// sends to.
    pod: FastKey,
    client_in: FastKey,
    /// The endpoint's socket (endpoint → client), and the proxy's socket
    /// it sends to.
    endpoint: FastKey,
    upstream_out: FastKey,
}

impl Pair {
    /// The sending socket of one direction.
    fn sender(&self, upstream: bool) -> Option<FastKey> {
        let keys = self.keys()?;
        Some(if upstream { keys.pod } else { keys.endpoint })
    }

    /// Registers both directions (the first caller does).
    fn register(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            REGISTERED => return true,
            REFUSED => return false,
            _ => {}
        }
        let ok = self.insert();
        if !ok && self.inserted.load(Ordering::Acquire) {
            // Half registered: nothing of it may be decided.
            self.forget();
        }
        self.state
            .store(if ok { REGISTERED } else { REFUSED }, Ordering::Release);
        ok
    }

    /// The four sockets' keys, worked out once.
    fn keys(&self) -> Option<&Keys> {
        if let Some(keys) = self.keys.get() {
            return Some(keys);
        }
        let keys = self.splicer.keys(self.fds)?;
        Some(self.keys.get_or_init(|| keys))
    }

    fn insert(&self) -> bool {
        let splicer = &self.splicer;
        let Some(keys) = self.keys() else {
            return false;
        };
        // Every socket of the four on the fast path: the endpoint's is
        // not when it is on another node (nothing to splice).
        let cookie = |key| splicer.cookie(key);
        let (Some(pod), Some(endpoint), Some(client_in), Some(upstream_out)) = (
            cookie(&keys.pod),
            cookie(&keys.endpoint),
            cookie(&keys.client_in),
            cookie(&keys.upstream_out),
        ) else {
            return false;
        };
        self.inserted.store(true, Ordering::Release);
        {
            // Reports first: a direction without one is never decided.
            let mut forwarded = splicer
                .forwarded
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (key, caught) in [
                (&keys.pod, &self.caught[0]),
                (&keys.endpoint, &self.caught[1]),
            ] {
                if forwarded
                    .insert(key, caught.load(Ordering::Acquire), NOEXIST)
                    .is_err()
                {
                    return false;
                }
            }
        }
        let mut splices = splicer
            .splices
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = |target, target_cookie, out, out_cookie| Splice {
            target,
            out,
            target_cookie,
            out_cookie,
            state: splice::PENDING,
            ..Splice::default()
        };
        splices
            .insert(
                keys.pod,
                entry(keys.endpoint, endpoint, keys.upstream_out, upstream_out),
                NOEXIST,
            )
            .is_ok()
            && splices
                .insert(
                    keys.endpoint,
                    entry(keys.pod, pod, keys.client_in, client_in),
                    NOEXIST,
                )
                .is_ok()
    }

    fn forget(&self) {
        if let Some(keys) = self.keys.get() {
            self.splicer.forget(&keys.pod);
            self.splicer.forget(&keys.endpoint);
        }
    }
}

impl Spliced {
    /// The reporter of the client → endpoint direction (`upstream`) or of
    /// the other.
    pub fn reporter(&self, upstream: bool) -> Reporter {
        Reporter {
            pair: Arc::clone(&self.0),
            upstream,
            reported: 0,
            catch_ups: 0,
        }
    }

    /// Tells whether the proxy may move one direction (`upstream`: client
    /// → endpoint) to `splice(2)`, which reads only TCP's queue: only if
    /// nothing was ever queued on the proxy's socket socket to socket
    /// (its entry's `fed`) and its sender sends through TCP for good: its
    /// first message took TCP (a bulk stream's, see
    /// `dataplane_common::FAST_BULK_MESSAGE`, or its peer was not on the
    /// fast path yet), or it is not on the fast path at all (an endpoint
    /// on another node). `fed` tells a sender that closed after sending
    /// socket to socket, its data still queued, from one that never was
    /// on the fast path. Two map lookups (and the connection's addresses,
    /// the first time).
    pub fn splice_gate(&self, upstream: bool) -> SpliceGate {
        SpliceGate {
            pair: Arc::clone(&self.0),
            upstream,
        }
    }

    /// Bytes spliced so far: (client → endpoint, endpoint → client).
    pub fn bytes(&self) -> (u64, u64) {
        let pair = &self.0;
        if !pair.inserted.load(Ordering::Acquire) {
            return (0, 0);
        }
        let bytes = |upstream| {
            pair.sender(upstream)
                .map_or(0, |key| pair.splicer.spliced_bytes(&key))
        };
        (bytes(true), bytes(false))
    }
}

/// See [`Spliced::splice_gate`].
pub struct SpliceGate {
    pair: Arc<Pair>,
    upstream: bool,
}

impl SpliceGate {
    /// Reads the sender's path in the programs' table (see
    /// [`Spliced::splice_gate`]).
    pub fn check(&self) -> SpliceCheck {
        let pair = &self.pair;
        let Some(keys) = pair.keys() else {
            return SpliceCheck::Never;
        };
        let (sender, receiver) = if self.upstream {
            (keys.pod, keys.client_in)
        } else {
            (keys.endpoint, keys.upstream_out)
        };
        let splicer = &pair.splicer;
        let (Ok(receiver), Ok(sender)) = (splicer.path(&receiver), splicer.path(&sender)) else {
            return SpliceCheck::Never;
        };
        if receiver.is_some_and(|path| path.fed != 0) {
            return SpliceCheck::Never;
        }
        match sender.map(|path| path.decision) {
            // Not on the fast path (another node's socket, or one the maps
            // had no room for), and nothing ever queued on the proxy's
            // socket: TCP only.
            None | Some(fast_path::TCP) => SpliceCheck::Safe,
            Some(fast_path::UNDECIDED) => SpliceCheck::NotYet,
            Some(_) => SpliceCheck::Never,
        }
    }
}

/// What [`SpliceGate::check`] found for a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceCheck {
    /// Its data comes through TCP only, until its sender closes: `splice`
    /// sees every byte.
    Safe,
    /// Its sender has not sent yet.
    NotYet,
    /// Some of its data goes, or went, socket to socket, or the maps could
    /// not be read.
    Never,
}

impl Drop for Spliced {
    fn drop(&mut self) {
        if self.0.inserted.load(Ordering::Acquire) {
            self.0.forget();
        }
    }
}

/// How many times a direction catches up with new bytes before the
/// connection is registered: the second shows a conversation (more after
/// an answer, or a message in two reads), worth the map writes; most
/// connections that end at their first exchange never pay them.
const REGISTER_AT_CATCH_UP: u8 = 2;

/// Reports a direction makes before giving up: one that never gets
/// decided (the proxy is never caught up when its sender sends, as with a
/// sender that never pauses) stops costing a map write per catch-up. A
/// stream whose sender rarely pauses (the answers of a bulk echo, which
/// started small and stayed on the fast path) is decided only when a
/// report wins the race with its next message, which one in a few dozen
/// does: with 64 the benchmark's unpinned bulk echo was spliced in some
/// runs only (37 % to 97 % of direct); with 250, bulk-only runs made
/// 44 % to 108 %, though one full run still lost every race (20 %). At
/// most 250 map writes per direction, in the life of a stream.
const MAX_REPORTS: u8 = 250;

/// Reports one direction's progress while its splice is undecided.
pub struct Reporter {
    pair: Arc<Pair>,
    upstream: bool,
    reported: u64,
    catch_ups: u8,
}

impl Reporter {
    /// Everything read from the sender up to `bytes` is written on. At the
    /// second time with new bytes, both directions are registered; then
    /// one map update whenever `bytes` changed. False once the direction
    /// cannot be spliced, is decided, or has reported [`MAX_REPORTS`]
    /// times (drop the reporter).
    pub fn caught_up(&mut self, bytes: u64) -> bool {
        if bytes == self.reported {
            return true;
        }
        self.reported = bytes;
        let pair = &self.pair;
        pair.caught[usize::from(!self.upstream)].store(bytes, Ordering::Release);
        self.catch_ups = self.catch_ups.saturating_add(1);
        if pair.state.load(Ordering::Acquire) != REGISTERED {
            return self.catch_ups < REGISTER_AT_CATCH_UP || pair.register();
        }
        if self.catch_ups > MAX_REPORTS {
            return false;
        }
        match pair.sender(self.upstream) {
            Some(sender) => pair.splicer.report(&sender, bytes),
            None => false,
        }
    }
}

/// Whether `release` (`uname -r`) is at least `major.minor`; an unreadable
/// release is taken as recent (the programs' load is the final test).
pub fn kernel_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => true,
    }
}

/// `--fast-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FastPath {
    /// Through TCP, as between any two sockets.
    #[default]
    Off,
    /// Socket to socket (sk_msg), for pods and the proxy on this node.
    On,
}

/// The path's line in the agent's log.
pub fn describe(on: bool) -> &'static str {
    if on {
        "on: data between pods and the proxy on this node goes socket to socket (sk_msg)"
    } else {
        "off: data between pods and the proxy goes through TCP"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(kernel_at_least("6.18.44-fc-v1045\n", (5, 15)));
        assert!(kernel_at_least("5.15.0-91-generic", (5, 15)));
        assert!(!kernel_at_least("5.14.0-362.el9.x86_64", (5, 15)));
        assert!(!kernel_at_least("4.19.0", (5, 15)));
        assert!(kernel_at_least("", (5, 15)));
    }

    #[test]
    fn the_namespace_cookie_is_stable_and_nonzero() {
        let first = own_netns_cookie().unwrap();
        assert_ne!(first, 0);
        assert_eq!(own_netns_cookie().unwrap(), first);
    }
}
