//! The pipes bulk directions splice through, and how large they may be.
//!
//! The kernel charges every pipe's slots to its owner's user: here uid 0,
//! shared with every process running as root on the node, containers
//! included. Past `fs.pipe-user-pages-soft` (16,384 pages, 64 MiB, by
//! default), a process without `CAP_SYS_RESOURCE` (the agent has none) can
//! no longer grow a pipe, and every new pipe of such a root process gets
//! two pages. So the agent grows at most [`MAX_LARGE_PIPES`] pipes at a
//! time (8 MiB, an eighth of that limit); the others keep the kernel's
//! default (64 KiB each, as before pipes were grown, so a node with about
//! a thousand bulk directions at once still reaches the limit). A large
//! pipe keeps its place until its direction's transfers are small again
//! or the connection closes, so 32 connections that once moved bulk and
//! idle since leave the next ones the default size. The agent splices only
//! through a pipe that holds one whole read of its buffer (64 KiB).

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tracing::warn;

/// Pipe capacity asked for a spliced direction, so the most one splice
/// moves. Four times the kernel's default (64 KiB): each splice call reads
/// its socket once (one ACK to the sender) and writes one larger burst:
/// the benchmark's bulk echo through the node proxy made 17 % more
/// throughput with it pinned, 18 % unpinned (medians of 8 runs each on a
/// 2-vCPU VM; 512 KiB and 1 MiB did no better, and left the fast path's
/// splice past the proxy to chance more often). A pipe holds references to
/// the socket's pages, not copies; what it holds is what waits for a slow
/// writer, as in any proxy's per-connection buffer. Within the kernel's
/// `fs.pipe-max-size` (1 MiB by default).
pub const PIPE_SIZE: usize = 256 * 1024;

/// Pipes of [`PIPE_SIZE`] at once, at most: 8 MiB of pipe slots, an
/// eighth of the default per-user limit. Further bulk directions get the
/// kernel's default size, as before there were large pipes.
pub const MAX_LARGE_PIPES: usize = 32;

/// The smallest pipe worth splicing through: one full read of the
/// relay's buffer. A smaller one (the kernel's two pages, once uid 0 is
/// past its limit) would turn every splice into a small one.
const MIN_PIPE: usize = super::copy::SCRATCH;

/// The agent's large pipes.
static LARGE: PipeBudget = PipeBudget::new(MAX_LARGE_PIPES);

/// Said once: the kernel gave a pipe too small to splice through.
static SMALL_WARNED: AtomicBool = AtomicBool::new(false);

/// A non-blocking pipe, closed on drop.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    /// Bytes it holds at most, as the kernel says (so the most one splice
    /// into it may ask).
    pub capacity: usize,
    /// Holds one of [`LARGE`]'s places.
    large: Option<&'static PipeBudget>,
}

impl Pipe {
    /// A pipe for a bulk direction: large while [`LARGE`] has room, else
    /// the kernel's default; an error if the kernel gave less than a full
    /// read (the direction then keeps copying).
    pub fn new() -> io::Result<Pipe> {
        Pipe::with_budget(&LARGE, PIPE_SIZE)
    }

    /// A pipe of `size` bytes if `budget` has a place and the kernel
    /// agrees, else of the kernel's default size.
    fn with_budget(budget: &'static PipeBudget, size: usize) -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // The size the kernel set, if it grew the pipe.
        let grown = if budget.take() {
            let grown = resize(&write, size).ok();
            if grown.is_none() {
                budget.give_back();
            }
            grown
        } else {
            None
        };
        let mut pipe = Pipe {
            read,
            write,
            capacity: 0,
            large: grown.map(|_| budget),
        };
        // What the kernel says it holds: its answer to the resize, or
        // asked (the default differs with the page size and sysctls).
        pipe.capacity = match grown {
            Some(size) => size,
            None => capacity(&pipe.write)?,
        };
        if pipe.capacity < MIN_PIPE {
            if !SMALL_WARNED.swap(true, Ordering::Relaxed) {
                warn!(
                    bytes = pipe.capacity,
                    needed = MIN_PIPE,
                    "the kernel made a relay pipe too small to splice through: root's \
                     processes on this node hold more pipe pages than \
                     fs.pipe-user-pages-soft allows (raise it, or find the processes \
                     holding pipes), or fs.pipe-max-size is set below 64 KiB; bulk TCP \
                     is copied instead of spliced until pipes are large enough again \
                     (said once)"
                );
            }
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        Ok(pipe)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if let Some(budget) = self.large {
            budget.give_back();
        }
    }
}

/// Asks for a pipe of `size` bytes; the capacity the kernel set (`size`
/// rounded up to pages), or an error if it refused (over
/// `fs.pipe-max-size`, or the user's pipe limit reached).
fn resize(pipe: &OwnedFd, size: usize) -> io::Result<usize> {
    let size = libc::c_int::try_from(size).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: the descriptor is an open pipe we own; F_SETPIPE_SZ takes
    // an int and touches no memory of ours.
    let set = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    usize::try_from(set).map_err(|_| io::Error::last_os_error())
}

/// The pipe's capacity in bytes.
fn capacity(pipe: &OwnedFd) -> io::Result<usize> {
    // SAFETY: the descriptor is an open pipe we own; F_GETPIPE_SZ only
    // reads its size.
    let size = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_GETPIPE_SZ) };
    usize::try_from(size).map_err(|_| io::Error::last_os_error())
}

/// A count of places, taken and given back without a lock.
pub struct PipeBudget {
    used: AtomicUsize,
    max: usize,
}

impl PipeBudget {
    const fn new(max: usize) -> PipeBudget {
        PipeBudget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes one place, if there is one left.
    fn take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.max).then_some(used + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }

    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_says_what_the_kernel_gave_it() {
        static BUDGET: PipeBudget = PipeBudget::new(1);
        let pipe = Pipe::with_budget(&BUDGET, PIPE_SIZE).unwrap();
        assert!(pipe.large.is_some());
        assert_eq!(pipe.capacity, PIPE_SIZE);
        // SAFETY: an open pipe we own; F_GETPIPE_SZ reads its size.
        let size = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert_eq!(
            usize::try_from(size).unwrap(),
            PIPE_SIZE,
            "the kernel's own answer"
        );
        drop(pipe);
        assert_eq!(BUDGET.used(), 0, "its place given back");
    }

    #[test]
    fn a_size_the_kernel_refuses_gives_the_place_back_and_a_default_pipe() {
        static BUDGET: PipeBudget = PipeBudget::new(1);
        // More than an int holds, so more than fs.pipe-max-size.
        let pipe = Pipe::with_budget(&BUDGET, usize::MAX).unwrap();
        assert!(pipe.large.is_none());
        assert_eq!(BUDGET.used(), 0, "the place was given back");
        assert_eq!(pipe.capacity, 16 * page_size(), "the kernel's default size");
    }

    #[test]
    fn only_so_many_pipes_are_large_at_once_and_a_closed_one_frees_its_place() {
        static BUDGET: PipeBudget = PipeBudget::new(2);
        let first = Pipe::with_budget(&BUDGET, PIPE_SIZE).unwrap();
        let second = Pipe::with_budget(&BUDGET, PIPE_SIZE).unwrap();
        assert!(first.large.is_some() && second.large.is_some());
        assert_eq!(BUDGET.used(), 2);
        let third = Pipe::with_budget(&BUDGET, PIPE_SIZE).unwrap();
        assert!(third.large.is_none(), "no place left");
        assert_eq!(
            third.capacity,
            16 * page_size(),
            "the kernel's default size"
        );
        drop(first);
        assert_eq!(BUDGET.used(), 1);
        let fourth = Pipe::with_budget(&BUDGET, PIPE_SIZE).unwrap();
        assert!(fourth.large.is_some());
        assert_eq!(fourth.capacity, PIPE_SIZE);
        drop((second, third, fourth));
        assert_eq!(BUDGET.used(), 0);
    }

    fn page_size() -> usize {
        // SAFETY: sysconf reads a constant of the system.
        usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap()
    }
}
