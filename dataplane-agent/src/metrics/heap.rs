//! The agent's heap as its allocator (jemalloc) counts it: what the
//! program holds (`allocated`) and what the allocator holds of memory for
//! it (`resident`). Against the process's RSS they tell live data from
//! memory the allocator keeps, which is what to look at when the agent's
//! memory grows.

use std::ffi::{CStr, c_void};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Default)]
pub struct HeapMetrics {
    allocated: Gauge,
    resident: Gauge,
}

impl HeapMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("dataplane_heap");
        r.register(
            "allocated_bytes",
            "Bytes the agent holds on its heap (jemalloc stats.allocated)",
            self.allocated.clone(),
        );
        r.register(
            "resident_bytes",
            "Bytes of memory the heap allocator holds, in use or not (jemalloc stats.resident)",
            self.resident.clone(),
        );
    }

    /// Reads the allocator's statistics now. Where jemalloc is linked but
    /// not the global allocator (the library's tests), they are jemalloc's
    /// own, not the program's.
    pub fn refresh(&self) {
        // The statistics are a snapshot taken when the epoch advances.
        let mut epoch: u64 = 1;
        let mut len = std::mem::size_of::<u64>();
        let epoch_ptr = (&raw mut epoch).cast::<c_void>();
        // SAFETY: "epoch" reads and writes a u64; both pointers are to one
        // live u64 and `len` is its size.
        let _ = unsafe {
            tikv_jemalloc_sys::mallctl(c"epoch".as_ptr(), epoch_ptr, &raw mut len, epoch_ptr, len)
        };
        self.allocated.set(read(c"stats.allocated"));
        self.resident.set(read(c"stats.resident"));
    }
}

/// A `size_t` statistic, as an i64 for a gauge (0 when unavailable).
fn read(name: &CStr) -> i64 {
    let mut value: usize = 0;
    let mut len = std::mem::size_of::<usize>();
    // SAFETY: `name` is a statistic of type size_t; the output pointer is
    // to a live usize and `len` is its size; nothing is written.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            (&raw mut value).cast::<c_void>(),
            &raw mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc == 0 {
        i64::try_from(value).unwrap_or(i64::MAX)
    } else {
        0
    }
}
