//! Time for the open loop: one monotonic nanosecond clock, and an alarm
//! precise to microseconds.
//!
//! tokio's timers tick in milliseconds, so `sleep_until` a scheduled send
//! time would send up to a millisecond late, and since latency counts from
//! the scheduled time, every request would carry that error: more than the
//! proxy hop being measured. A `timerfd` armed at an absolute
//! `CLOCK_MONOTONIC` time fires on a high-resolution timer instead, and
//! waits through the runtime's epoll like any socket.

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Nanoseconds on `CLOCK_MONOTONIC` (what `timerfd` counts in), so
/// schedules, alarms and measurements share one clock.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer;
    // CLOCK_MONOTONIC always exists on Linux, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * NANOS_PER_SEC + nanos
}

/// Asks the kernel to fire this thread's timers on time. By default a
/// thread's timers may be deferred by up to 50 us ("timer slack") to
/// batch wake-ups; on an open-loop schedule that would be added to every
/// latency. Best effort: failing only costs precision.
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

/// A one-shot `timerfd`, re-armed for each wait.
pub struct Alarm {
    fd: AsyncFd<OwnedFd>,
}

impl Alarm {
    /// Must be called inside the tokio runtime (it registers the fd).
    pub fn new() -> io::Result<Alarm> {
        // SAFETY: timerfd_create has no memory arguments; the result is
        // checked before it is used as a file descriptor.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it
        // open and unchanged until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Alarm { fd })
    }

    /// Returns at `at_ns` (on [`mono_ns`]'s clock), or at once when that
    /// has passed.
    pub async fn sleep_until(&mut self, at_ns: u64) -> io::Result<()> {
        if mono_ns() >= at_ns {
            return Ok(());
        }
        self.arm(at_ns)?;
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into an 8-byte local buffer.
            let n = unsafe {
                libc::read(
                    guard.get_inner().as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            if n == 8 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            guard.clear_ready();
        }
    }

    fn arm(&self, at_ns: u64) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(at_ns / NANOS_PER_SEC).unwrap_or(libc::time_t::MAX),
                // Below 10^9, so it fits any c_long.
                tv_nsec: libc::c_long::try_from(at_ns % NANOS_PER_SEC).unwrap_or(0),
            },
        };
        // SAFETY: timerfd_settime reads one itimerspec from a valid
        // pointer and is allowed a null old-value pointer.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.get_ref().as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alarm_fires_on_time_not_on_a_millisecond_tick() -> io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        tighten_timer_slack();
        rt.block_on(async {
            let mut alarm = Alarm::new()?;
            let mut lateness = Vec::new();
            for _ in 0..21 {
                let at = mono_ns() + 300_000;
                alarm.sleep_until(at).await?;
                let now = mono_ns();
                assert!(now >= at, "woke {} ns early", at - now);
                lateness.push(now - at);
            }
            lateness.sort_unstable();
            let median = lateness[lateness.len() / 2];
            eprintln!(
                "alarm lateness: median {median} ns, worst {:?}",
                lateness.last()
            );
            // A millisecond-tick timer would be ~500 us late on average.
            assert!(median < 250_000, "alarm median {median} ns late");
            // A time in the past returns at once.
            alarm.sleep_until(0).await
        })
    }
}
