//! Enrolls a pod the moment its cgroup appears.
//!
//! kubelet creates a pod's cgroup before it starts any container in it.
//! With only the periodic walk, a pod started between two walks would make
//! its first connections uncaptured for up to `--resync`: they would bypass
//! the mesh. An inotify watch on the pods' cgroup tree reports the new
//! directory within microseconds, before the pod's first process runs.
//!
//! Watched: the pods' cgroup and every directory below it that may hold
//! pods (QoS classes, systemd slices), including those created later: a
//! `burstable/` made just before its first pod is watched at once and
//! scanned for what was created before the watch. Pod directories are not
//! watched inside (their container cgroups are covered by the pod's
//! enrollment). The periodic walk stays as the safety net: for an event
//! queue overflow (answered here with a full rescan), a watch that could
//! not be added, or a pod added to the config after its cgroup appeared.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tracing::{debug, warn};

use super::cgroup;

/// How often the watching thread checks whether it should stop.
const STOP_CHECK_MS: i32 = 200;

/// Room for many events per read (one is at most 16 + 256 bytes).
const EVENT_BUFFER: usize = 16 * 1024;

/// Called with the pod UID and the pod's cgroup directory for every pod
/// directory seen: when created, when found while scanning a directory
/// that just got its watch, and in a rescan after an overflow. A pod may
/// be reported more than once (created between its parent's watch and
/// scan, or again in a rescan): the callback must be idempotent.
pub type OnPod = Box<dyn FnMut(&str, &Path) + Send>;

/// The watching thread; dropping this stops it.
pub struct PodCgroupWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PodCgroupWatcher {
    /// Watches `root` (the pods' cgroup) and the directories below it that
    /// may hold pods. Fails only if `root` itself cannot be watched.
    pub fn start(root: PathBuf, on_pod: OnPod) -> io::Result<Self> {
        let mut tree = Tree {
            inotify: Inotify::init()?,
            watched: HashMap::new(),
            root,
            on_pod,
        };
        tree.watch_root()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("cgroup-watch".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || tree.run(&stop)
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for PodCgroupWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Tree {
    inotify: Inotify,
    /// Each watched directory and its depth below `root`.
    watched: HashMap<WatchDescriptor, (PathBuf, usize)>,
    root: PathBuf,
    on_pod: OnPod,
}

/// One event, copied out of the read buffer.
struct Seen {
    wd: WatchDescriptor,
    mask: EventMask,
    name: Option<OsString>,
}

impl Tree {
    fn watch_root(&mut self) -> io::Result<()> {
        let root = self.root.clone();
        self.watch(&root, 0)
    }

    /// Watches `dir` for new subdirectories, then looks at those it already
    /// has: they may have been created before the watch existed.
    fn watch(&mut self, dir: &Path, depth: usize) -> io::Result<()> {
        let mask = WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::ONLYDIR;
        let wd = self.inotify.watches().add(dir, mask)?;
        self.watched.insert(wd, (dir.to_path_buf(), depth));
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.found(entry.path(), depth + 1);
            }
        }
        Ok(())
    }

    /// A directory `depth` levels below the root: a pod to report, or a
    /// level that may hold pods, to watch.
    fn found(&mut self, dir: PathBuf, depth: usize) {
        let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
            return;
        };
        if let Some(uid) = cgroup::pod_uid_of_dir(name) {
            (self.on_pod)(&uid, &dir);
        } else if cgroup::may_hold_pods(depth)
            && let Err(err) = self.watch(&dir, depth)
        {
            // Gone already, or out of inotify watches: the walk covers it.
            debug!(dir = %dir.display(), %err, "cgroup directory not watched");
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut buffer = vec![0u8; EVENT_BUFFER];
        while !stop.load(Ordering::Relaxed) {
            match self.wait_readable() {
                Ok(true) => {}
                Ok(false) => continue,
                Err(err) => return self.give_up(&err),
            }
            let events: Vec<Seen> = match self.inotify.read_events(&mut buffer) {
                Ok(events) => events
                    .map(|e| Seen {
                        wd: e.wd,
                        mask: e.mask,
                        name: e.name.map(OsString::from),
                    })
                    .collect(),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return self.give_up(&err),
            };
            for event in events {
                self.handle(event);
            }
        }
    }

    fn handle(&mut self, event: Seen) {
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            warn!(root = %self.root.display(), "cgroup events were lost; rescanning");
            if let Err(err) = self.watch_root() {
                warn!(%err, "rescanning the pods' cgroups failed");
            }
        } else if event.mask.contains(EventMask::IGNORED) {
            // The directory was removed.
            self.watched.remove(&event.wd);
        } else if event.mask.contains(EventMask::ISDIR)
            && let Some((parent, depth)) = self.watched.get(&event.wd)
            && let Some(name) = event.name
        {
            let (dir, depth) = (parent.join(name), depth + 1);
            self.found(dir, depth);
        }
    }

    /// Waits for events at most [`STOP_CHECK_MS`]; true when there are some.
    fn wait_readable(&self) -> io::Result<bool> {
        let mut fd = libc::pollfd {
            fd: self.inotify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the inotify fd lives as long as `self`.
        match unsafe { libc::poll(&mut fd, 1, STOP_CHECK_MS) } {
            n if n > 0 => Ok(true),
            0 => Ok(false),
            _ => match io::Error::last_os_error() {
                err if err.kind() == io::ErrorKind::Interrupted => Ok(false),
                err => Err(err),
            },
        }
    }

    fn give_up(&self, err: &io::Error) {
        warn!(
            root = %self.root.display(),
            %err,
            "watching the pods' cgroups failed: new pods are enrolled at the next --resync"
        );
    }
}

#[cfg(test)]
mod tests;
