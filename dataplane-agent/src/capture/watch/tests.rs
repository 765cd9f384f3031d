//! The watcher on a plain directory tree (inotify works on any
//! filesystem; no root or cgroup needed).

use std::collections::HashSet;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use super::*;

/// Generous: events arrive in microseconds, but CI machines are busy.
const WAIT: Duration = Duration::from_secs(5);

struct TempTree(PathBuf);

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Report = (String, PathBuf);

/// The pods the watcher reported, read in order. A pod directory created
/// just after its parent got a watch and before the parent was scanned is
/// reported twice, by its event and by the scan (enrolling twice is
/// harmless): repeats are skipped here.
struct Reports {
    rx: Receiver<Report>,
    seen: HashSet<Report>,
}

impl Reports {
    /// The next pod not reported before.
    fn next_pod(&mut self) -> Report {
        loop {
            let report = self
                .rx
                .recv_timeout(WAIT)
                .expect("a pod directory was reported");
            if self.seen.insert(report.clone()) {
                return report;
            }
        }
    }

    /// Fails if a pod not reported before comes within `quiet`.
    fn assert_no_new_pod(&mut self, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        while let Ok(report) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            assert!(!self.seen.insert(report.clone()), "unexpected {report:?}");
        }
    }
}

fn start(name: &str) -> (TempTree, PodCgroupWatcher, Reports) {
    let root = std::env::temp_dir().join(format!("dp-watch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("existing/podold")).expect("mkdir");
    let (tx, rx) = mpsc::channel();
    let on_pod: OnPod = Box::new(move |uid, dir| {
        let _ = tx.send((uid.to_string(), dir.to_path_buf()));
    });
    let watcher = PodCgroupWatcher::start(root.clone(), on_pod).expect("watch");
    let reports = Reports {
        rx,
        seen: HashSet::new(),
    };
    (TempTree(root), watcher, reports)
}

#[test]
fn reports_pods_present_at_start_and_created_later() {
    let (tree, _watcher, mut reports) = start("flat");
    assert_eq!(
        reports.next_pod(),
        ("old".into(), tree.0.join("existing/podold"))
    );

    std::fs::create_dir(tree.0.join("podnew")).expect("mkdir");
    assert_eq!(reports.next_pod(), ("new".into(), tree.0.join("podnew")));
    // Container cgroups inside a pod are nobody's business here.
    std::fs::create_dir(tree.0.join("podnew/app")).expect("mkdir");
    reports.assert_no_new_pod(Duration::from_millis(300));
}

/// A QoS level and its first pod made in one go: the pod directory exists
/// before the level's watch does, and is found by scanning it (or by its
/// event too, if it came just after the watch).
#[test]
fn new_levels_are_watched_and_scanned_as_they_appear() {
    let (tree, _watcher, mut reports) = start("nested");
    reports.next_pod();
    std::fs::create_dir_all(tree.0.join("burstable/podb1/app")).expect("mkdir");
    assert_eq!(
        reports.next_pod(),
        ("b1".into(), tree.0.join("burstable/podb1"))
    );
    std::fs::create_dir(tree.0.join("burstable/podb2")).expect("mkdir");
    assert_eq!(
        reports.next_pod(),
        ("b2".into(), tree.0.join("burstable/podb2"))
    );
    // systemd driver naming, one level deeper.
    let slice = "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12_ab.slice";
    std::fs::create_dir_all(tree.0.join(slice)).expect("mkdir");
    assert_eq!(reports.next_pod(), ("12-ab".into(), tree.0.join(slice)));
}

#[test]
fn looks_exactly_as_deep_as_the_walk() {
    let (tree, _watcher, mut reports) = start("depth");
    reports.next_pod();
    std::fs::create_dir_all(tree.0.join("a/b/c/podtoodeep")).expect("mkdir");
    std::fs::create_dir_all(tree.0.join("a/b/podjustright")).expect("mkdir");
    assert_eq!(reports.next_pod().0, "justright");
    reports.assert_no_new_pod(Duration::from_millis(300));
    let walked = cgroup::find_pods(&tree.0);
    let mut uids: Vec<_> = walked.keys().cloned().collect();
    uids.sort();
    assert_eq!(uids, ["justright", "old"]);
}

/// The race above cannot be staged from outside the watcher; what the
/// tests rely on is that a repeated report is skipped, and a new one is not.
#[test]
fn repeated_reports_are_skipped_and_new_ones_are_not() {
    let (tx, rx) = mpsc::channel();
    let mut reports = Reports {
        rx,
        seen: HashSet::new(),
    };
    let b1: Report = ("b1".into(), PathBuf::from("burstable/podb1"));
    let b2: Report = ("b2".into(), PathBuf::from("burstable/podb2"));
    for report in [&b1, &b1, &b2, &b2] {
        tx.send(report.clone()).expect("send");
    }
    assert_eq!(reports.next_pod(), b1);
    assert_eq!(reports.next_pod(), b2);
    reports.assert_no_new_pod(Duration::from_millis(10));
}

#[test]
fn a_root_that_cannot_be_watched_is_an_error() {
    let missing = std::env::temp_dir().join(format!("dp-watch-missing-{}", std::process::id()));
    assert!(PodCgroupWatcher::start(missing, Box::new(|_, _| {})).is_err());
}
