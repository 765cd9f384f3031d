//! How many threads the proxy's async runtime runs (`--worker-threads`).
//!
//! A node proxy spends most of its time in the kernel (accept, connect,
//! splice, small reads and writes), so extra workers mostly add cross-thread
//! wake-ups: two workers sharing one CPU hand work to each other through
//! futexes on every message. The default therefore follows what the agent
//! may actually use, which `available_parallelism` reads from the CPU
//! affinity mask and the cgroup's CPU quota (a DaemonSet's `limits.cpu`):
//! one CPU, one worker. Always tokio's multi-thread scheduler, even for one
//! worker: the run loop's blocking work (cgroup walks, map syncs) runs in
//! `block_on` on the main thread, which a single-threaded runtime would
//! share with every connection.

use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;

use anyhow::Context as _;

/// `--worker-threads`: `auto` or a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// As many as CPUs the process may use (affinity and cgroup quota).
    #[default]
    Auto,
    Fixed(NonZeroUsize),
}

impl FromStr for Workers {
    type Err = String;

    fn from_str(text: &str) -> Result<Workers, String> {
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(Workers::Auto);
        }
        match text.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => {
                Ok(Workers::Fixed(NonZeroUsize::new(n).ok_or("zero")?))
            }
            _ => Err(format!(
                "`auto` or a number of threads from 1 to 1024, got {text:?}"
            )),
        }
    }
}

impl fmt::Display for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workers::Auto => f.write_str("auto"),
            Workers::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl Workers {
    /// The number of worker threads this setting means on this machine.
    pub fn resolve(self) -> usize {
        match self {
            Workers::Fixed(n) => n.get(),
            Workers::Auto => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        }
    }

    /// The runtime, with this many workers (one worker has no other to hand
    /// tasks to or steal from).
    pub fn build(self) -> anyhow::Result<tokio::runtime::Runtime> {
        let threads = self.resolve();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .with_context(|| format!("starting the async runtime with {threads} worker threads"))?;
        tracing::info!(setting = %self, threads, "async runtime");
        Ok(runtime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_auto_and_counts_and_names_bad_values() {
        assert_eq!("auto".parse(), Ok(Workers::Auto));
        assert_eq!(" AUTO ".parse(), Ok(Workers::Auto));
        assert_eq!("2".parse::<Workers>().map(Workers::resolve), Ok(2));
        for bad in ["0", "-1", "two", "", "5000"] {
            let err = bad.parse::<Workers>().unwrap_err();
            assert!(err.contains("auto"), "{bad}: {err}");
        }
    }

    #[test]
    fn auto_follows_the_cpus_the_process_may_use() {
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        assert_eq!(Workers::Auto.resolve(), cpus);
    }

    #[test]
    fn one_worker_keeps_the_main_thread_for_block_on() {
        let one = Workers::Fixed(NonZeroUsize::MIN).build().unwrap();
        assert_eq!(
            one.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        assert_eq!(one.metrics().num_workers(), 1);
        // What block_on runs is not on the worker: blocking it does not
        // stop spawned tasks (the proxy's connections).
        let main = std::thread::current().id();
        let worker = one.block_on(async {
            let spawned = tokio::spawn(async { std::thread::current().id() });
            std::thread::sleep(std::time::Duration::from_millis(50));
            spawned.await.unwrap()
        });
        assert_ne!(worker, main);
        let two = Workers::Fixed(NonZeroUsize::new(2).unwrap())
            .build()
            .unwrap();
        assert_eq!(
            two.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        assert_eq!(two.metrics().num_workers(), 2);
    }
}
