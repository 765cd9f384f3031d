//! Hot reload of the mesh config file: a valid change applies to new
//! connections and requests; an invalid one is rejected with the parser's
//! error (field and line) and the last good config stays in force.

use std::path::PathBuf;

use crate::config::{ConfigError, MeshConfig};

/// Watches one file by content (robust to coarse or unchanged mtimes, and
/// to editors that replace the file).
pub struct ConfigWatcher {
    path: PathBuf,
    last_text: String,
}

/// What a poll found.
#[derive(Debug)]
pub enum Change {
    Unchanged,
    Valid(Box<MeshConfig>),
    Invalid(ConfigError),
}

impl ConfigWatcher {
    /// `current_text` is the text the running config came from.
    pub fn new(path: PathBuf, current_text: String) -> Self {
        Self {
            path,
            last_text: current_text,
        }
    }

    pub fn poll(&mut self) -> Change {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(source) => {
                // Report a missing file once, not at every poll.
                if self.last_text.is_empty() {
                    return Change::Unchanged;
                }
                self.last_text.clear();
                return Change::Invalid(ConfigError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        if text == self.last_text {
            return Change::Unchanged;
        }
        let parsed = MeshConfig::parse(&text, &self.path);
        // Remember even a bad text, so that it is reported once.
        self.last_text = text;
        match parsed {
            Ok(cfg) => Change::Valid(Box::new(cfg)),
            Err(err) => Change::Invalid(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_each_change_once_and_rejects_bad_text() {
        let dir = std::env::temp_dir().join(format!("dp-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("mesh.yaml");
        let good = "services: []\n";
        std::fs::write(&path, good).expect("write");
        let mut watcher = ConfigWatcher::new(path.clone(), good.to_string());
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
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
