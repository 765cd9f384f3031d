//! Hot reload of the mesh config file: a valid change applies to new
//! connections and requests; anything else is rejected with the reason
//! (for a parse error: the file, the field and the line) and the last good
//! config stays in force.
//!
//! Writers should replace the file atomically (write a temporary file in
//! the same directory, then rename it over the config), as Kubernetes does
//! for a mounted ConfigMap. A writer that rewrites the file in place can be
//! caught halfway, and a cut-off YAML file is often still valid YAML (a
//! list cut after its third item is a shorter list), so one read cannot
//! tell "partial" from "new". The watcher therefore only takes a text that
//! two reads a moment apart agree on, and refuses an empty file. A text
//! that settles back to the one in force (the same content rewritten) is
//! no change.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{ConfigError, MeshConfig};

/// How long apart the reads of a changed file are: a writer that is still
/// writing almost always changes the file within this time.
const SETTLE: Duration = Duration::from_millis(50);

/// Reads of one poll before the change is given up as still in progress
/// (at most `(MAX_READS - 1) * SETTLE` of waiting, on a blocking thread).
const MAX_READS: usize = 5;

/// Why a changed config file was not applied.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    /// Unreadable, or not a valid config (the message names field and line).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Truncating is the first step of an in-place rewrite; an empty config
    /// would also drop every service at once.
    #[error(
        "config {path} is empty (a writer truncating it to rewrite in place?); \
         an empty mesh must be written as `services: []`"
    )]
    Empty { path: PathBuf },
    /// Reads a moment apart kept differing: a writer is at work.
    #[error(
        "config {path} kept changing over {reads} reads {settle:?} apart (being written in \
         place?); not applied, retried at the next resync. Write it elsewhere and rename it \
         into place"
    )]
    StillChanging {
        path: PathBuf,
        reads: usize,
        settle: Duration,
    },
}

impl Rejected {
    /// Whether the same file content may pass at the next poll without
    /// anybody touching it (so it must not be remembered as seen).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::StillChanging { .. })
    }
}

/// How the watcher reads the file; replaced in tests to act out a writer
/// caught halfway.
type ReadFn = Box<dyn FnMut(&Path) -> io::Result<String> + Send>;

/// Watches one file by content (robust to coarse or unchanged mtimes, and
/// to editors that replace the file). Polls block (they read and may sleep
/// [`SETTLE`]): call them from a blocking thread.
pub struct ConfigWatcher {
    path: PathBuf,
    /// The last text reported (applied, or rejected once).
    last_text: String,
    /// An unreadable file was reported and has not been readable since:
    /// not reported again at every poll.
    unreadable_reported: bool,
    settle: Duration,
    read: ReadFn,
}

/// What a poll found.
#[derive(Debug)]
pub enum Change {
    Unchanged,
    Valid(Box<MeshConfig>),
    Invalid(Rejected),
}

impl ConfigWatcher {
    /// `current_text` is the text the running config came from.
    pub fn new(path: PathBuf, current_text: String) -> Self {
        Self {
            path,
            last_text: current_text,
            unreadable_reported: false,
            settle: SETTLE,
            read: Box::new(|path| std::fs::read_to_string(path)),
        }
    }

    /// Reads the file with `read` instead of `std::fs::read_to_string`,
    /// waiting `settle` between reads.
    #[cfg(test)]
    pub(crate) fn with_reader(
        mut self,
        settle: Duration,
        read: impl FnMut(&Path) -> io::Result<String> + Send + 'static,
    ) -> Self {
        self.settle = settle;
        self.read = Box::new(read);
        self
    }

    pub fn poll(&mut self) -> Change {
        let text = match (self.read)(&self.path) {
            Ok(text) => text,
            Err(source) => return self.unreadable(source),
        };
        self.unreadable_reported = false;
        if text == self.last_text {
            return Change::Unchanged;
        }
        let text = match self.settled(text) {
            Ok(text) => text,
            Err(rejected) => return Change::Invalid(rejected),
        };
        // An in-place rewrite of the same content, caught halfway, settles
        // back to the text already in force: nothing changed.
        if text == self.last_text {
            return Change::Unchanged;
        }
        let parsed = if text.trim().is_empty() {
            Err(Rejected::Empty {
                path: self.path.clone(),
            })
        } else {
            MeshConfig::parse(&text, &self.path).map_err(Rejected::from)
        };
        // Remember even a bad text, so that it is reported once.
        self.last_text = text;
        match parsed {
            Ok(cfg) => Change::Valid(Box::new(cfg)),
            Err(rejected) => Change::Invalid(rejected),
        }
    }

    /// Reads again until two reads `settle` apart agree, starting from
    /// `first`. Not remembered when they never do: the next poll retries.
    fn settled(&mut self, first: String) -> Result<String, Rejected> {
        let mut previous = first;
        for _ in 1..MAX_READS {
            std::thread::sleep(self.settle);
            let text = (self.read)(&self.path).map_err(|source| {
                // Reported now: not again while it stays unreadable.
                self.unreadable_reported = true;
                ConfigError::Read {
                    path: self.path.clone(),
                    source,
                }
            })?;
            if text == previous {
                return Ok(text);
            }
            previous = text;
        }
        Err(Rejected::StillChanging {
            path: self.path.clone(),
            reads: MAX_READS,
            settle: self.settle,
        })
    }

    fn unreadable(&mut self, source: io::Error) -> Change {
        // Report a missing file once, not at every poll. The last text is
        // kept: the same file back again is no change.
        if self.unreadable_reported {
            return Change::Unchanged;
        }
        self.unreadable_reported = true;
        Change::Invalid(
            ConfigError::Read {
                path: self.path.clone(),
                source,
            }
            .into(),
        )
    }
}

#[cfg(test)]
mod tests;
