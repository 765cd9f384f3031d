//! Every map and load-time global of the programs, in one place.
//!
//! Maps are pinned by name so that a restarted agent finds the same
//! enrollment and service tables (pods stay captured while it restarts) and
//! connections in flight keep their original destination.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash, SockMap},
};
use dataplane_common::{
    ConnKey, EnrolledPod, ExportKey, FastKey, FastPath, OrigDst, ServiceKey, ServiceValue, Splice,
    capacity, stats,
};

#[map(name = "DP_ENROLLED")]
pub static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(capacity::ENROLLED, 0);

#[map(name = "DP_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, 0);

/// A tenant's services other tenants may call (see `connect`).
#[map(name = "DP_EXPORTS")]
pub static EXPORTS: HashMap<ExportKey, u8> = HashMap::pinned(capacity::EXPORTS, 0);

/// A plain hash (not LRU) so that a full map is detected and reported rather
/// than silently evicting the destination of a connection being set up.
#[map(name = "DP_ORIG_DST")]
pub static ORIG_DST: HashMap<u64, OrigDst> = HashMap::pinned(capacity::ORIG_DST, 0);

/// LRU: an entry lives from establishment until the proxy reads it
/// (microseconds); if the proxy never asks (it died), eviction reclaims it.
#[map(name = "DP_CONNS")]
pub static CONNS: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(capacity::CONNS, 0);

/// The node proxy's listening sockets (see
/// `dataplane_common::maps::PROXY_LISTENERS`). Pinned, so that the programs
/// of any agent see the listeners of every other.
#[map(name = "DP_PROXY_LISTENERS")]
pub static PROXY_LISTENERS: SockMap = SockMap::pinned(capacity::PROXY_LISTENERS, 0);

/// The kernel fast path's sockets (see `fast`). Pinned, so that sockets
/// inserted under one agent stay reachable by the next.
#[map(name = "DP_FAST_SOCKS")]
pub static FAST_SOCKS: SockHash<FastKey> = SockHash::pinned(capacity::FAST_SOCKS, 0);

/// `BPF_F_NO_PREALLOC`: entries allocated as inserted and freed after the
/// programs using them have finished, so a removed entry's memory never
/// becomes another connection's while a program reads it (preallocated
/// and LRU maps reuse it at once).
const NO_PREALLOC: u32 = 1;

/// Per sending socket of `FAST_SOCKS`, its path (see `fast`); as large as
/// `FAST_SOCKS`, since every entry belongs to a socket there. Allocated
/// as used: an agent with the fast path off (the default) holds no
/// memory for it.
#[map(name = "DP_FAST_PATHS")]
pub static FAST_PATHS: HashMap<FastKey, FastPath> =
    HashMap::pinned(capacity::FAST_SOCKS, NO_PREALLOC);

/// Directions the proxy asked the kernel to splice past it (see `fast`).
/// The proxy removes its entries when the connection ends, and an agent
/// clears what a previous one left when it starts (removing an entry only
/// sends its data through the proxy again, in order: see `fast`).
#[map(name = "DP_FAST_SPLICE")]
pub static FAST_SPLICE: HashMap<FastKey, Splice> =
    HashMap::pinned(capacity::FAST_SPLICE, NO_PREALLOC);

/// Per direction of `FAST_SPLICE`, what the proxy has written on (its
/// only writer besides the programs' removal).
#[map(name = "DP_FAST_FORWARDED")]
pub static FAST_FORWARDED: HashMap<FastKey, u64> =
    HashMap::pinned(capacity::FAST_SPLICE, NO_PREALLOC);

#[map(name = "DP_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

#[unsafe(no_mangle)]
pub static DP_PROXY_IP4: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
pub static DP_PROXY_PORT: Global<u16> = Global::new(0);

#[unsafe(no_mangle)]
pub static DP_PROXY_MARK: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
pub static DP_PROXY_DOWN: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
pub static DP_FAST_PATH: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
pub static DP_PROXY_NETNS: Global<u64> = Global::new(0);

/// Adds one to a counter of [`dataplane_common::stats`].
#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the map lookup and is this CPU's slot.
        unsafe { *counter += 1 };
    }
}
