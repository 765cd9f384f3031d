//! Pinned maps whose layout does not fit the programs being loaded.
//!
//! aya reuses a map pinned under a map's name without looking at it. A map
//! of another type, key or value size, capacity or flags would then be
//! shared silently with programs compiled for a different layout: the
//! verifier may reject them, or they read and write entries of the wrong
//! size. Such a map is left behind by an upgrade that changed a layout
//! without bumping the versioned maps directory, or by a downgrade.
//!
//! The agent replaces it, after a warning that names the map and both
//! layouts: it unpins the old map, and the loader creates the new one. What
//! an operator wants during such an upgrade is a node that keeps working:
//! refusing to start would leave the enrolled pods captured by the previous
//! programs with no proxy behind them (every connection to a service
//! refused) until someone removed the map by hand. What replacing costs is
//! what a new maps directory costs: the old map's entries. It does not
//! cost capture: the agent fills the enrollment and service tables from the
//! config before it attaches the new programs, and the previous agent's
//! programs keep their old map until their links are replaced, so every
//! connect is captured by one or the other (see [`super::Capture`]). The
//! counters restart from zero, and if a per-connection map is replaced,
//! connections captured by the previous programs and not yet accepted by
//! the proxy lose their original destination and are reset.
//!
//! Something pinned there that is not a map at all is not removed: that is
//! an error naming the path.

use std::fmt;
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapType};
use aya_obj::generated::bpf_map_type;
use aya_obj::maps::PinningType;
use tracing::warn;

use super::CaptureError;

/// What the kernel knows of a map's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl Layout {
    fn of_object(map: &aya_obj::Map) -> Self {
        Self {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        }
    }

    fn of_pin(path: &Path) -> Result<Self, aya::maps::MapError> {
        let info = MapData::from_pin(path)?.info()?;
        Ok(Self {
            // An unknown type never equals a type the programs declare.
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// Whether programs declaring `wanted` can share this map. For the
    /// types whose capacity or value size aya adjusts when it creates them
    /// (perf event arrays, ring buffers, CPU and device maps), only the
    /// type and key size are compared, or they would never match.
    pub fn fits(&self, wanted: &Layout) -> bool {
        let adjusted = [
            bpf_map_type::BPF_MAP_TYPE_PERF_EVENT_ARRAY,
            bpf_map_type::BPF_MAP_TYPE_RINGBUF,
            bpf_map_type::BPF_MAP_TYPE_CPUMAP,
            bpf_map_type::BPF_MAP_TYPE_DEVMAP,
            bpf_map_type::BPF_MAP_TYPE_DEVMAP_HASH,
        ]
        .iter()
        .any(|t| *t as u32 == wanted.map_type);
        if adjusted {
            return (self.map_type, self.key_size) == (wanted.map_type, wanted.key_size);
        }
        self == wanted
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = bpf_map_type::try_from(self.map_type)
            .ok()
            .and_then(|t| MapType::try_from(t).ok());
        match kind {
            Some(kind) => write!(f, "{kind:?}")?,
            None => write!(f, "type {}", self.map_type)?,
        }
        write!(
            f,
            " (key {} B, value {} B, {} entries, flags {:#x})",
            self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// Checks each map of `object` that is pinned by name against the map
/// pinned under `maps_dir`, and unpins those that do not fit (after a
/// warning), so that the loader creates them anew.
pub fn replace_misfits(object: &[u8], maps_dir: &Path) -> Result<(), CaptureError> {
    let object =
        aya_obj::Object::parse(object).map_err(|err| CaptureError::Object(err.to_string()))?;
    for (name, map) in &object.maps {
        if map.pinning() != PinningType::ByName {
            continue;
        }
        let path = maps_dir.join(name);
        if std::fs::symlink_metadata(&path).is_err() {
            continue;
        }
        let wanted = Layout::of_object(map);
        let pinned = Layout::of_pin(&path).map_err(|err| not_a_map(&path, &err))?;
        if pinned.fits(&wanted) {
            continue;
        }
        warn!(
            map = %name,
            path = %path.display(),
            pinned = %pinned,
            programs = %wanted,
            "the pinned map's layout differs from this agent's programs: replacing it \
             (its entries are lost; tables are rewritten from the config)"
        );
        std::fs::remove_file(&path).map_err(|source| CaptureError::Bpffs {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

fn not_a_map(path: &Path, err: &aya::maps::MapError) -> CaptureError {
    CaptureError::PinnedMap {
        path: PathBuf::from(path),
        message: format!(
            "something is pinned here that is not a readable eBPF map ({err}); \
             remove it, or run `dataplane-agent cleanup`"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: u32 = bpf_map_type::BPF_MAP_TYPE_HASH as u32;

    fn layout(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> Layout {
        Layout {
            map_type,
            key_size,
            value_size,
            max_entries,
            flags: 0,
        }
    }

    #[test]
    fn any_difference_in_type_sizes_capacity_or_flags_is_a_misfit() {
        let wanted = layout(HASH, 8, 4, 4096);
        assert!(wanted.fits(&wanted));
        for pinned in [
            layout(bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32, 8, 4, 4096),
            layout(HASH, 4, 4, 4096),
            layout(HASH, 8, 8, 4096),
            layout(HASH, 8, 4, 1024),
            Layout { flags: 1, ..wanted },
        ] {
            assert!(!pinned.fits(&wanted), "{pinned} must not fit {wanted}");
        }
    }

    #[test]
    fn sizes_aya_adjusts_are_not_compared() {
        let ringbuf = bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32;
        assert!(layout(ringbuf, 0, 0, 8192).fits(&layout(ringbuf, 0, 0, 4096)));
        assert!(!layout(HASH, 0, 0, 4096).fits(&layout(ringbuf, 0, 0, 4096)));
    }

    #[test]
    fn layouts_read_like_bpftool() {
        assert_eq!(
            layout(HASH, 8, 4, 4096).to_string(),
            "Hash (key 8 B, value 4 B, 4096 entries, flags 0x0)"
        );
        assert_eq!(
            layout(9999, 1, 2, 3).to_string(),
            "type 9999 (key 1 B, value 2 B, 3 entries, flags 0x0)"
        );
    }

    /// The embedded object pins its maps by name, so the check has
    /// something to check (a parse failure would show here too).
    #[test]
    fn the_programs_pin_their_tables_by_name() {
        let object = aya_obj::Object::parse(super::super::EBPF_OBJECT).expect("object");
        let pinned: Vec<&str> = object
            .maps
            .iter()
            .filter(|(_, map)| map.pinning() == PinningType::ByName)
            .map(|(name, _)| name.as_str())
            .collect();
        for name in [
            dataplane_common::maps::ENROLLED,
            dataplane_common::maps::SERVICES,
        ] {
            assert!(pinned.contains(&name), "{name} in {pinned:?}");
        }
    }
}
