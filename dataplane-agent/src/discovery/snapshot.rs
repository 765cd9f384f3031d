//! A discovery source's last good state on disk, so that an agent started
//! while its source is down (every registry member, the API server) still
//! routes. Written atomically (a
//! temporary file in the same directory, fsync, rename, fsync of the
//! directory), so a crash leaves the old snapshot or the new one, never
//! half of one. Read defensively: an unknown format, a wrong length or
//! checksum (a torn or corrupted file), unparsable content or an age
//! beyond the limit is an error that says which, and the agent starts
//! without it.
//!
//! Format: one header line of JSON, then the body (JSON: the registry's
//! services, the Kubernetes source's whole state):
//! `{"format":1,"writtenAtMs":<unix ms>,"scope":"<prefixes read>","length":<body bytes>,"fnv1a64":"<hex>"}`.
//! `scope` names what was read (prefix and tenants): an agent that reads
//! something else does not route from it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config;

/// The format this build writes and reads.
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {path}: {why}; ignored")]
    Invalid { path: PathBuf, why: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Header {
    format: u32,
    written_at_ms: u64,
    scope: String,
    length: usize,
    fnv1a64: String,
}

/// A snapshot read back.
#[derive(Debug)]
pub struct Snapshot<T = Vec<config::Service>> {
    pub services: T,
    /// How old it is.
    pub age: Duration,
}

/// FNV-1a, 64 bits: detects torn and corrupted files (not tampering: the
/// file is the agent's own, on the node).
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_more(FNV_OFFSET, bytes)
}

fn fnv1a64_more(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Counts and sums what is serialized into it, keeping none of it.
struct Digest {
    length: usize,
    hash: u64,
}

impl Write for Digest {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.length += buf.len();
        self.hash = fnv1a64_more(self.hash, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes `services` (a source's state), read from `scope`, to `path`
/// atomically.
pub fn write<T: Serialize + ?Sized>(
    path: &Path,
    scope: &str,
    services: &T,
) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Serialized twice, never held whole: once for the header's length and
    // checksum, once into the file (a large cluster's state is tens of
    // megabytes of JSON).
    let mut digest = Digest {
        length: 0,
        hash: FNV_OFFSET,
    };
    serde_json::to_writer(&mut digest, services).map_err(|e| io(std::io::Error::other(e)))?;
    let header = Header {
        format: FORMAT,
        written_at_ms: unix_ms(SystemTime::now()),
        scope: scope.to_string(),
        length: digest.length,
        fnv1a64: format!("{:016x}", digest.hash),
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    // Per process: an old and a new agent may write at once in an upgrade.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        serde_json::to_writer(&mut file, &header).map_err(|e| io(std::io::Error::other(e)))?;
        file.write_all(b"\n").map_err(io)?;
        serde_json::to_writer(&mut file, services).map_err(|e| io(std::io::Error::other(e)))?;
        let file = file.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    // The rename itself reaches the disk with the directory.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Reads the snapshot at `path`; written for another `scope` or older than
/// `max_age`: an error.
pub fn read<T: serde::de::DeserializeOwned>(
    path: &Path,
    scope: &str,
    max_age: Duration,
) -> Result<Snapshot<T>, SnapshotError> {
    let text = std::fs::read(path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |why: String| SnapshotError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let newline = text
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| invalid("no header line (truncated?)".into()))?;
    let (head, body) = (&text[..newline], &text[newline + 1..]);
    let header: Header =
        serde_json::from_slice(head).map_err(|e| invalid(format!("unreadable header: {e}")))?;
    if header.format != FORMAT {
        return Err(invalid(format!(
            "format {} (this agent reads {FORMAT})",
            header.format
        )));
    }
    if header.scope != scope {
        return Err(invalid(format!(
            "written for {:?}, this agent reads {scope:?}",
            header.scope
        )));
    }
    if body.len() != header.length {
        return Err(invalid(format!(
            "{} bytes of body where the header says {} (truncated?)",
            body.len(),
            header.length
        )));
    }
    let sum = format!("{:016x}", fnv1a64(body));
    if sum != header.fnv1a64 {
        return Err(invalid(format!(
            "checksum {sum} where the header says {} (corrupted)",
            header.fnv1a64
        )));
    }
    let written = UNIX_EPOCH + Duration::from_millis(header.written_at_ms);
    let age = SystemTime::now()
        .duration_since(written)
        .unwrap_or(Duration::ZERO);
    if age > max_age {
        return Err(invalid(format!(
            "written {}s ago, more than the {}s trusted",
            age.as_secs(),
            max_age.as_secs()
        )));
    }
    let services: T =
        serde_json::from_slice(body).map_err(|e| invalid(format!("unreadable body: {e}")))?;
    Ok(Snapshot { services, age })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<config::Service> {
        let yaml = "services:\n  - name: cart\n    namespace: shop\n    vip: 198.19.0.30:80\n    protocol: http\n    endpoints: [{address: 10.1.0.1:8080, zone: a}]\n    trafficPolicy: {retries: {attempts: 1}}\n";
        config::MeshConfig::parse(yaml, Path::new("t"))
            .unwrap()
            .services
            .into_iter()
            .map(std::sync::Arc::unwrap_or_clone)
            .collect()
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dp-snapshot-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("registry.snapshot")
    }

    const DAY: Duration = Duration::from_secs(86_400);
    const S: &str = "/dataplane/v1/";

    #[test]
    fn round_trips() {
        let path = tmp("ok");
        write(&path, S, &services()).unwrap();
        let snap = read::<Vec<config::Service>>(&path, S, DAY).unwrap();
        assert_eq!(snap.services, services());
        assert!(snap.age < Duration::from_secs(60));
        let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file left");
    }

    #[test]
    fn damaged_snapshots_are_refused_with_the_reason() {
        let path = tmp("bad");
        write(&path, S, &services()).unwrap();
        let good = std::fs::read(&path).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", good[..good.len() - 7].to_vec()),
            ("corrupted", {
                let mut b = good.clone();
                let last = b.len() - 3;
                b[last] ^= 0x20;
                b
            }),
            (
                "format 2",
                String::from_utf8(good.clone())
                    .unwrap()
                    .replacen("\"format\":1", "\"format\":2", 1)
                    .into_bytes(),
            ),
            ("no header line", b"garbage".to_vec()),
            ("unreadable header", b"{\"format\n{}".to_vec()),
        ];
        for (want, bytes) in cases {
            std::fs::write(&path, bytes).unwrap();
            let err = read::<Vec<config::Service>>(&path, S, DAY)
                .expect_err(want)
                .to_string();
            assert!(err.contains(want), "{want}: {err}");
            assert!(err.contains("ignored"), "{err}");
        }
        // Written in 1970: far older than any limit.
        let text = String::from_utf8(good).unwrap();
        let at = text.find("\"writtenAtMs\":").unwrap() + "\"writtenAtMs\":".len();
        let end = at + text[at..].find(',').unwrap();
        std::fs::write(&path, format!("{}1000{}", &text[..at], &text[end..])).unwrap();
        let err = read::<Vec<config::Service>>(&path, S, DAY)
            .expect_err("too old")
            .to_string();
        assert!(err.contains("trusted"), "{err}");
        // Another agent's scope (other tenants): not used.
        write(&path, S, &services()).unwrap();
        let err = read::<Vec<config::Service>>(&path, "/dataplane/v1/services/b/", DAY)
            .expect_err("scope")
            .to_string();
        assert!(err.contains("written for"), "{err}");
    }
}
