use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::*;

const FULL: &str = "\
services:
  - name: echo
    vip: 198.19.0.10:80
    endpoints:
      - address: 198.18.0.11:8080
  - name: web
    vip: 198.19.0.11:80
    endpoints:
      - address: 198.18.0.12:8080
pods:
  - uid: client-uid
";

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dp-reload-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        Self(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("mesh.yaml")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn watcher_on(path: &Path, text: &str) -> ConfigWatcher {
    std::fs::write(path, text).expect("write");
    ConfigWatcher::new(path.to_path_buf(), text.to_string())
}

#[test]
fn reports_each_change_once_and_rejects_bad_text() {
    let dir = TempDir::new("once");
    let path = dir.file();
    let good = "services: []\n";
    let mut watcher = watcher_on(&path, good);
    assert!(matches!(watcher.poll(), Change::Unchanged));

    std::fs::write(&path, "services: 3\n").expect("write");
    match watcher.poll() {
        Change::Invalid(err) => assert!(err.to_string().contains("line 1"), "{err}"),
        other => panic!("expected invalid, got {other:?}"),
    }
    assert!(matches!(watcher.poll(), Change::Unchanged), "reported once");

    std::fs::write(&path, "pods: [{uid: a}]\n").expect("write");
    match watcher.poll() {
        Change::Valid(cfg) => assert_eq!(cfg.pods.len(), 1),
        other => panic!("expected valid, got {other:?}"),
    }
}

#[test]
fn a_truncated_file_is_rejected_naming_file_field_and_line() {
    let dir = TempDir::new("truncated");
    let path = dir.file();
    let mut watcher = watcher_on(&path, FULL);
    // Cut inside the second service's address.
    let cut = FULL.find("198.19.0.11").expect("vip") + 6;
    std::fs::write(&path, &FULL[..cut]).expect("write");
    let err = match watcher.poll() {
        Change::Invalid(err) => err.to_string(),
        other => panic!("expected invalid, got {other:?}"),
    };
    for want in [path.to_string_lossy().as_ref(), "services[1].vip", "line 7"] {
        assert!(err.contains(want), "{err:?} should name {want:?}");
    }
}

#[test]
fn an_empty_file_is_rejected() {
    let dir = TempDir::new("empty");
    let path = dir.file();
    let mut watcher = watcher_on(&path, FULL);
    std::fs::write(&path, "").expect("truncate");
    match watcher.poll() {
        Change::Invalid(err @ Rejected::Empty { .. }) => assert!(!err.is_transient()),
        other => panic!("expected empty, got {other:?}"),
    }
}

/// A writer caught halfway through a valid-looking prefix: the first read
/// sees the first service only (valid YAML), the writer finishes before
/// the second read. The partial text is never applied.
#[test]
fn a_valid_prefix_seen_while_the_writer_continues_is_not_applied() {
    let dir = TempDir::new("prefix");
    let path = dir.file();
    let prefix = &FULL[..FULL.find("  - name: web").expect("web")];
    let parsed = MeshConfig::parse(prefix, &path).expect("the prefix is valid YAML");
    assert_eq!(parsed.services.len(), 1);
    std::fs::write(&path, prefix).expect("first half");

    let reads = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reads);
    let mut watcher = ConfigWatcher::new(path.clone(), "services: []\n".into()).with_reader(
        Duration::from_millis(1),
        move |path| {
            let text = std::fs::read_to_string(path);
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                // The writer goes on between our first and second read.
                std::fs::write(path, FULL)?;
            }
            text
        },
    );
    match watcher.poll() {
        Change::Valid(cfg) => assert_eq!(cfg.services.len(), 2, "the whole file"),
        other => panic!("expected the complete config, got {other:?}"),
    }
    assert_eq!(
        reads.load(Ordering::SeqCst),
        3,
        "read until two reads agreed"
    );
}

/// A file that changes at every read is not applied, nor remembered: once
/// the writer is done, the next poll applies it.
#[test]
fn a_file_still_being_written_is_retried_at_the_next_poll() {
    let written = Arc::new(Mutex::new(String::from("services:\n")));
    let growing = Arc::clone(&written);
    let mut watcher = ConfigWatcher::new(PathBuf::from("mesh.yaml"), "services: []\n".into())
        .with_reader(Duration::from_millis(1), move |_| {
            let mut text = growing.lock().expect("lock");
            let snapshot = text.clone();
            // Mid-write: every read finds one more (valid) service line.
            if !snapshot.contains("pods") {
                let n = snapshot.matches("{name").count();
                text.push_str(&format!("  - {{name: s{n}, vip: '198.19.0.{n}:80'}}\n"));
            }
            Ok(snapshot)
        });
    match watcher.poll() {
        Change::Invalid(err) => {
            assert!(err.is_transient(), "{err}");
            assert!(err.to_string().contains("rename it into place"), "{err}");
        }
        other => panic!("expected a change in progress, got {other:?}"),
    }
    written.lock().expect("lock").push_str("pods: []\n");
    match watcher.poll() {
        Change::Valid(cfg) => assert_eq!(cfg.services.len(), MAX_READS),
        other => panic!("expected the finished config, got {other:?}"),
    }
}

/// The same content rewritten in place, caught halfway: the first read
/// sees a cut-off text, the next ones the old text again. Nothing changed,
/// so nothing is applied (no spurious reload).
#[test]
fn a_rewrite_of_the_same_content_caught_halfway_is_no_change() {
    let reads = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reads);
    let mut watcher = ConfigWatcher::new(PathBuf::from("mesh.yaml"), FULL.into()).with_reader(
        Duration::from_millis(1),
        move |_| {
            Ok(match counter.fetch_add(1, Ordering::SeqCst) {
                0 => FULL[..FULL.find("  - name: web").expect("web")].to_string(),
                _ => FULL.to_string(),
            })
        },
    );
    match watcher.poll() {
        Change::Unchanged => {}
        other => panic!("expected no change, got {other:?}"),
    }
    assert_eq!(
        reads.load(Ordering::SeqCst),
        3,
        "read until two reads agreed"
    );
    assert!(matches!(watcher.poll(), Change::Unchanged));
}

/// A missing file is reported once, also when an empty file (reported as
/// such) came before it, and again each time it goes.
#[test]
fn a_missing_file_is_reported_once_also_after_an_empty_one() {
    let dir = TempDir::new("missing");
    let path = dir.file();
    let mut watcher = watcher_on(&path, FULL);
    let reported_missing = |change: Change| {
        matches!(
            change,
            Change::Invalid(Rejected::Config(ConfigError::Read { .. }))
        )
    };

    std::fs::write(&path, "").expect("truncate");
    assert!(matches!(
        watcher.poll(),
        Change::Invalid(Rejected::Empty { .. })
    ));
    std::fs::remove_file(&path).expect("remove");
    assert!(reported_missing(watcher.poll()), "missing after empty");
    assert!(matches!(watcher.poll(), Change::Unchanged), "reported once");

    std::fs::write(&path, "services: []\n").expect("a new config");
    assert!(matches!(watcher.poll(), Change::Valid(_)));
    std::fs::remove_file(&path).expect("remove");
    assert!(reported_missing(watcher.poll()), "missing again");
    assert!(matches!(watcher.poll(), Change::Unchanged), "reported once");
}

/// A file that went missing and came back as it was is no change: the
/// config in force came from that very text.
#[test]
fn a_file_back_as_it_was_is_no_change() {
    let dir = TempDir::new("back");
    let path = dir.file();
    let mut watcher = watcher_on(&path, FULL);
    std::fs::remove_file(&path).expect("remove");
    assert!(matches!(watcher.poll(), Change::Invalid(_)));
    std::fs::write(&path, FULL).expect("back");
    match watcher.poll() {
        Change::Unchanged => {}
        other => panic!("expected no change, got {other:?}"),
    }
}
