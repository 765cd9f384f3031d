//! The watcher on a plain directory tree (inotify works on any
//! filesystem; no root or cgroup needed).

use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use super::*;

/// Generous: events arrive in microseconds, but CI machines are busy.
const WAIT: Duration = Duration::from_secs(5);

struct TempTree(PathBuf);

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(name: &str) -> (TempTree, PodCgroupWatcher, Receiver<(String, PathBuf)>) {
    let root = std::env::temp_dir().join(format!("dp-watch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("existing/podold")).expect("mkdir");
    let (tx, rx) = mpsc::channel();
    let on_pod: OnPod = Box::new(move |uid, dir| {
        let _ = tx.send((uid.to_string(), dir.to_path_buf()));
    });
    let watcher = PodCgroupWatcher::start(root.clone(), on_pod).expect("watch");
    (TempTree(root), watcher, rx)
}

fn next_pod(rx: &Receiver<(String, PathBuf)>) -> (String, PathBuf) {
    rx.recv_timeout(WAIT).expect("a pod directory was reported")
}

#[test]
fn reports_pods_present_at_start_and_created_later() {
    let (tree, _watcher, rx) = start("flat");
    assert_eq!(
        next_pod(&rx),
        ("old".into(), tree.0.join("existing/podold"))
    );

    std::fs::create_dir(tree.0.join("podnew")).expect("mkdir");
    assert_eq!(next_pod(&rx), ("new".into(), tree.0.join("podnew")));
    // Container cgroups inside a pod are nobody's business here.
    std::fs::create_dir(tree.0.join("podnew/app")).expect("mkdir");
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
}

/// A QoS level and its first pod made in one go: the pod directory exists
/// before the level's watch does, and is found by scanning it.
#[test]
fn new_levels_are_watched_and_scanned_as_they_appear() {
    let (tree, _watcher, rx) = start("nested");
    next_pod(&rx);
    std::fs::create_dir_all(tree.0.join("burstable/podb1/app")).expect("mkdir");
    assert_eq!(next_pod(&rx), ("b1".into(), tree.0.join("burstable/podb1")));
    std::fs::create_dir(tree.0.join("burstable/podb2")).expect("mkdir");
    assert_eq!(next_pod(&rx), ("b2".into(), tree.0.join("burstable/podb2")));
    // systemd driver naming, one level deeper.
    let slice = "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12_ab.slice";
    std::fs::create_dir_all(tree.0.join(slice)).expect("mkdir");
    assert_eq!(next_pod(&rx), ("12-ab".into(), tree.0.join(slice)));
}

#[test]
fn looks_exactly_as_deep_as_the_walk() {
    let (tree, _watcher, rx) = start("depth");
    next_pod(&rx);
    std::fs::create_dir_all(tree.0.join("a/b/c/podtoodeep")).expect("mkdir");
    std::fs::create_dir_all(tree.0.join("a/b/podjustright")).expect("mkdir");
    assert_eq!(next_pod(&rx).0, "justright");
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    let walked = cgroup::find_pods(&tree.0);
    let mut uids: Vec<_> = walked.keys().cloned().collect();
    uids.sort();
    assert_eq!(uids, ["justright", "old"]);
}

#[test]
fn a_root_that_cannot_be_watched_is_an_error() {
    let missing = std::env::temp_dir().join(format!("dp-watch-missing-{}", std::process::id()));
    assert!(PodCgroupWatcher::start(missing, Box::new(|_, _| {})).is_err());
}
