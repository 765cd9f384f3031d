//! Copying both ways between two sockets, in the way that suits what flows.
//!
//! Most connections through a mesh carry small messages (requests,
//! responses, RPCs). For those the cheapest path is one `read` into a
//! buffer and one `write` out of it per message: no pipe to set up, and no
//! `EAGAIN` afterwards, because tokio takes a read that did not fill the
//! buffer as "drained" (its readiness is edge-triggered) and waits for the
//! next edge without asking the socket again. The buffer is one per thread
//! ([`SCRATCH`]), not per connection: a read is written on at once, and
//! what the writer does not take (up to one read, 64 KiB) is kept in a
//! buffer of the connection's own until it does, then freed; nothing more
//! is read meanwhile. An idle connection holds no buffer at all.
//!
//! A direction that keeps filling the buffer is a bulk transfer; it moves
//! to `splice(2)` through a pipe of its own (the bytes stay in the
//! kernel), and back to the buffer once its transfers are small again.
//! With the kernel fast path on, only once its sender is known to send
//! through TCP: `splice` does not see data queued socket to socket.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd as _, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead as _, AsyncWrite as _, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::pipe::Pipe;
use crate::capture::fast::{Reporter, SpliceCheck, SpliceGate, Spliced};

/// Size of the per-thread buffer, so of the largest single read.
pub const SCRATCH: usize = 64 * 1024;

/// Consecutive reads that fill the buffer before a direction moves to
/// splice: one full read can be a large message, two in a row is a stream.
const SPLICE_AFTER_FULL_READS: u8 = 2;

/// Consecutive splices below this size before a direction goes back to
/// the buffer.
const SMALL_SPLICE: usize = 16 * 1024;
const BUFFER_AFTER_SMALL_SPLICES: u8 = 8;

thread_local! {
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Bytes moved each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Read from `a`, written to `b`.
    pub a_to_b: u64,
    /// Read from `b`, written to `a`.
    pub b_to_a: u64,
}

/// Bytes moved so far each way, published while the copy runs (for the
/// idle watchdog, which runs beside it).
#[derive(Debug, Default)]
pub struct Progress {
    pub a_to_b: AtomicU64,
    pub b_to_a: AtomicU64,
}

impl Progress {
    /// Both ways together: it changes whenever anything moved.
    pub fn total(&self) -> u64 {
        self.a_to_b.load(Ordering::Relaxed) + self.b_to_a.load(Ordering::Relaxed)
    }
}

/// How many directions moved to splice, for tests and the curious.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Directions that moved from the buffer to splice.
    pub splice_switches: u32,
    /// Directions that went back from splice to the buffer.
    pub buffer_returns: u32,
}

/// Copies `a` ⇄ `b` until both directions have seen end-of-stream and
/// passed it on (`shutdown(SHUT_WR)`), or until one fails. The other
/// direction keeps going after one finishes, so half-close works.
/// `kernel` (the fast path on): the connection's directions, which the
/// kernel may splice past the proxy (each reports when it has written on
/// all it read), and which move to splice(2) only once their sender is
/// known to send through TCP.
pub async fn bidirectional(
    a: &mut TcpStream,
    b: &mut TcpStream,
    progress: &Progress,
    kernel: Option<&Spliced>,
) -> (io::Result<Totals>, Stats) {
    let direction = |upstream| Direction {
        splice: kernel.map_or(SpliceMode::Allowed, |k| {
            SpliceMode::Gated(k.splice_gate(upstream))
        }),
        reporter: kernel.map(|k| k.reporter(upstream)),
        ..Direction::default()
    };
    let mut forth = direction(true);
    let mut back = direction(false);
    let result = std::future::poll_fn(|cx| {
        let forth_done = forth.poll(cx, a, b);
        let back_done = back.poll(cx, b, a);
        progress.a_to_b.store(forth.bytes, Ordering::Relaxed);
        progress.b_to_a.store(back.bytes, Ordering::Relaxed);
        let (forth_done, back_done) = (forth_done?, back_done?);
        ready!(forth_done);
        ready!(back_done);
        Poll::Ready(Ok(Totals {
            a_to_b: forth.bytes,
            b_to_a: back.bytes,
        }))
    })
    .await;
    let stats = Stats {
        splice_switches: forth.switches + back.switches,
        buffer_returns: forth.returns + back.returns,
    };
    (result, stats)
}

/// One direction: reader → writer.
#[derive(Default)]
struct Direction {
    /// Bytes read that the writer has not taken yet, from `offset`.
    pending: Vec<u8>,
    offset: usize,
    /// In splice mode: the pipe and how many bytes sit in it.
    pipe: Option<Pipe>,
    in_pipe: usize,
    /// The reader reached end-of-stream.
    eof: bool,
    /// End-of-stream passed on: this direction is finished.
    done: bool,
    bytes: u64,
    full_reads: u8,
    small_splices: u8,
    switches: u32,
    returns: u32,
    /// Whether this direction may move to splice.
    splice: SpliceMode,
    /// While the kernel may still splice this direction past the proxy.
    reporter: Option<Reporter>,
}

impl Direction {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut TcpStream,
        writer: &mut TcpStream,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            ready!(self.flush(cx, writer))?;
            if self.eof {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            if self.pipe.is_some() {
                ready!(self.splice_in(cx, reader))?;
            } else if self.read_and_write(cx, reader, writer)?.is_pending() {
                // Nothing more to read, all read written on: caught up.
                if let Some(reporter) = &mut self.reporter
                    && !reporter.caught_up(self.bytes)
                {
                    self.reporter = None;
                }
                return Poll::Pending;
            }
        }
    }

    /// Writes what is waiting (buffered bytes or the pipe's contents).
    fn flush(&mut self, cx: &mut Context<'_>, writer: &mut TcpStream) -> Poll<io::Result<()>> {
        while self.offset < self.pending.len() {
            let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.pending[self.offset..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.offset += n;
            self.bytes += n as u64;
        }
        if self.offset > 0 {
            // Caught up: give the memory back.
            self.pending = Vec::new();
            self.offset = 0;
        }
        while self.in_pipe > 0 {
            let Some(pipe) = &self.pipe else { break };
            let from = pipe.read.as_raw_fd();
            let n = ready!(splice_ready(
                cx,
                writer,
                Interest::WRITABLE,
                from,
                writer.as_raw_fd(),
                self.in_pipe
            ))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.in_pipe -= n;
            self.bytes += n as u64;
        }
        if self.pipe.is_some() && self.small_splices >= BUFFER_AFTER_SMALL_SPLICES {
            self.pipe = None;
            self.small_splices = 0;
            self.returns += 1;
        }
        Poll::Ready(Ok(()))
    }

    /// Buffer mode: one read into the thread's buffer, written on at once;
    /// what the writer does not take now waits in `pending`.
    fn read_and_write(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut TcpStream,
        writer: &mut TcpStream,
    ) -> Poll<io::Result<()>> {
        BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            let mut read = ReadBuf::new(&mut buffer[..]);
            ready!(Pin::new(&mut *reader).poll_read(cx, &mut read))?;
            let filled = read.filled().len();
            if filled == 0 {
                self.eof = true;
                return Poll::Ready(Ok(()));
            }
            let mut written = 0;
            while written < filled {
                match Pin::new(&mut *writer).poll_write(cx, &buffer[written..filled]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => break,
                }
            }
            self.bytes += written as u64;
            if written < filled {
                self.pending.extend_from_slice(&buffer[written..filled]);
            }
            if filled == SCRATCH && !matches!(self.splice, SpliceMode::Never) {
                self.full_reads += 1;
                if self.full_reads >= SPLICE_AFTER_FULL_READS {
                    self.full_reads = 0;
                    if self.splice_allowed() {
                        match Pipe::new() {
                            Ok(pipe) => {
                                self.pipe = Some(pipe);
                                self.switches += 1;
                            }
                            // No pipe worth splicing through (descriptors
                            // exhausted, the node's pipe limit reached):
                            // the buffer works, and this direction stays
                            // on it rather than trying again and again.
                            Err(_) => self.splice = SpliceMode::Never,
                        }
                    }
                }
            } else {
                self.full_reads = 0;
            }
            Poll::Ready(Ok(()))
        })
    }

    /// Whether the direction may move to splice now, asking the kernel's
    /// maps if it must (once it is known either way). Safe stays safe,
    /// through later returns to the buffer: a sender on TCP stays there
    /// until it closes, and nothing else queues data on the proxy's socket.
    fn splice_allowed(&mut self) -> bool {
        let SpliceMode::Gated(gate) = &self.splice else {
            return matches!(self.splice, SpliceMode::Allowed);
        };
        match gate.check() {
            SpliceCheck::Safe => {
                self.splice = SpliceMode::Allowed;
                // A sender on TCP is never spliced past the proxy: its
                // reports would be map writes for nothing.
                self.reporter = None;
            }
            SpliceCheck::Never => self.splice = SpliceMode::Never,
            SpliceCheck::NotYet => {}
        }
        matches!(self.splice, SpliceMode::Allowed)
    }

    /// Splice mode: the reader's bytes into the (empty) pipe.
    fn splice_in(&mut self, cx: &mut Context<'_>, reader: &mut TcpStream) -> Poll<io::Result<()>> {
        let Some(pipe) = &self.pipe else {
            return Poll::Ready(Ok(()));
        };
        let to = pipe.write.as_raw_fd();
        let n = ready!(splice_ready(
            cx,
            reader,
            Interest::READABLE,
            reader.as_raw_fd(),
            to,
            pipe.capacity
        ))?;
        if n == 0 {
            self.eof = true;
        } else {
            self.in_pipe = n;
            if n < SMALL_SPLICE {
                self.small_splices += 1;
            } else {
                self.small_splices = 0;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Whether a direction may move to splice(2).
#[derive(Default)]
enum SpliceMode {
    #[default]
    Never,
    Allowed,
    /// Once the kernel's maps say its sender sends through TCP.
    Gated(SpliceGate),
}

/// One splice(2) of at most `len` bytes from `from` to `to` once `socket`
/// (one of the two) is ready for `interest`; waits again on `EAGAIN`.
fn splice_ready(
    cx: &mut Context<'_>,
    socket: &TcpStream,
    interest: Interest,
    from: RawFd,
    to: RawFd,
    len: usize,
) -> Poll<io::Result<usize>> {
    loop {
        if interest.is_readable() {
            ready!(socket.poll_read_ready(cx))?;
        } else {
            ready!(socket.poll_write_ready(cx))?;
        }
        match socket.try_io(interest, || splice(from, to, len)) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Poll::Ready(Err(err)),
        }
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (a
    // socket owned by a live TcpStream, a pipe owned by its Direction);
    // null offsets mean "the current position", as sockets and pipes need.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// client ⇄ [a relay b] ⇄ server; the relay's result comes back from
    /// the task.
    async fn relayed() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(io::Result<Totals>, Stats)>,
    ) {
        let (client, mut a) = pair().await;
        let (mut b, server) = pair().await;
        let relay =
            tokio::spawn(
                async move { bidirectional(&mut a, &mut b, &Progress::default(), None).await },
            );
        (client, server, relay)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn small_messages_go_through_the_buffer_both_ways() {
        let (mut client, mut server, relay) = relayed().await;
        let request = pattern(100, 1);
        let response = pattern(100, 2);
        for _ in 0..200 {
            client.write_all(&request).await.unwrap();
            let mut got = [0; 100];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got[..], request[..]);
            server.write_all(&response).await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got[..], response[..]);
        }
        drop(client);
        drop(server);
        let (totals, stats) = relay.await.unwrap();
        assert_eq!(
            totals.unwrap(),
            Totals {
                a_to_b: 20_000,
                b_to_a: 20_000
            }
        );
        assert_eq!(stats.splice_switches, 0, "small messages never need a pipe");
    }

    #[tokio::test]
    async fn a_bulk_transfer_moves_to_splice_and_arrives_exact_then_small_ones_come_back() {
        let (mut client, mut server, relay) = relayed().await;
        let bulk = pattern(16 << 20, 3);
        let sent = bulk.clone();
        let sender = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            // Then small messages again, each answered.
            let mut echo = [0; 64];
            for i in 0..20u8 {
                client.write_all(&[i; 64]).await.unwrap();
                client.read_exact(&mut echo).await.unwrap();
                assert_eq!(echo, [i; 64]);
            }
            client.shutdown().await.unwrap();
            client
        });
        // Let a backlog build so the relay's reads fill its buffer.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut got = vec![0; bulk.len()];
        server.read_exact(&mut got).await.unwrap();
        assert!(got == bulk, "bulk bytes differ");
        let mut small = [0; 64];
        for _ in 0..20 {
            server.read_exact(&mut small).await.unwrap();
            server.write_all(&small).await.unwrap();
        }
        assert_eq!(
            server.read(&mut small).await.unwrap(),
            0,
            "end of stream passed on"
        );
        server.shutdown().await.unwrap();
        let mut client = sender.await.unwrap();
        assert_eq!(client.read(&mut small).await.unwrap(), 0);
        let (totals, stats) = relay.await.unwrap();
        let totals = totals.unwrap();
        assert_eq!(totals.a_to_b, (16 << 20) + 20 * 64);
        assert_eq!(totals.b_to_a, 20 * 64);
        assert!(stats.splice_switches >= 1, "{stats:?}");
        assert!(
            stats.buffer_returns >= 1,
            "small messages after the bulk: {stats:?}"
        );
    }

    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_in_order() {
        let (mut client, mut server, relay) = relayed().await;
        let data = pattern(4 << 20, 4);
        let sent = data.clone();
        let sender = tokio::spawn(async move {
            // Small writes, so the buffer path (not splice) meets the
            // back-pressure.
            for chunk in sent.chunks(1000) {
                client.write_all(chunk).await.unwrap();
            }
            client.shutdown().await.unwrap();
            client
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(
            got == data,
            "{} of {} bytes, or out of order",
            got.len(),
            data.len()
        );
        server.shutdown().await.unwrap();
        drop(sender.await.unwrap());
        let (totals, _) = relay.await.unwrap();
        assert_eq!(totals.unwrap().a_to_b, 4 << 20);
    }

    #[tokio::test]
    async fn half_close_is_passed_on_and_the_answer_still_comes_back() {
        let (mut client, mut server, relay) = relayed().await;
        client.write_all(b"x").await.unwrap();
        client.shutdown().await.unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"x");
        server
            .write_all(b"answer after the client's FIN")
            .await
            .unwrap();
        server.shutdown().await.unwrap();
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();
        assert_eq!(response, b"answer after the client's FIN");
        let (totals, _) = relay.await.unwrap();
        assert_eq!(
            totals.unwrap(),
            Totals {
                a_to_b: 1,
                b_to_a: 29
            }
        );
    }

    #[tokio::test]
    async fn a_reset_ends_the_copy_with_an_error() {
        let (mut client, server, relay) = relayed().await;
        client.write_all(b"hello").await.unwrap();
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        let (totals, _) = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .unwrap()
            .unwrap();
        assert!(totals.is_err(), "{totals:?}");
    }
}
