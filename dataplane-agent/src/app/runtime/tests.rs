//! The running config only ever changes to a complete file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::*;

const ONE_SERVICE: &str = "\
services:
  - name: echo
    vip: 198.19.0.10:80
    endpoints:
      - address: 127.0.0.1:9
";

const TWO_SERVICES: &str = "\
services:
  - name: echo
    vip: 198.19.0.10:80
    endpoints:
      - address: 127.0.0.1:9
  - name: web
    vip: 198.19.0.11:80
    endpoints:
      - address: 127.0.0.1:10
      - address: 127.0.0.1:11
pods:
  - uid: client-uid
";

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn runtime_on(path: &Path, text: &str) -> Runtime {
    std::fs::write(path, text).expect("write config");
    let loaded = load_config(path).expect("valid start config");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("admin port");
    Runtime::start(loaded, NodeContext::default(), admin, |_| {})
}

fn service_names(rt: &Runtime) -> Vec<String> {
    rt.config.services.iter().map(|s| s.name.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_file_never_replaces_the_running_config() {
    let dir = TempDir(std::env::temp_dir().join(format!("dp-runtime-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let path = dir.0.join("mesh.yaml");
    let mut rt = runtime_on(&path, ONE_SERVICE).await;
    let running = rt.config.clone();

    // Cut mid-way through the second service: invalid YAML for a config.
    let cut = TWO_SERVICES.find("127.0.0.1:10").expect("endpoint") + 4;
    std::fs::write(&path, &TWO_SERVICES[..cut]).expect("partial write");
    assert!(!rt.reload().await, "a truncated file is not applied");
    assert_eq!(rt.config, running);
    assert_eq!(**rt.admin.config.load(), running, "/config_dump unchanged");

    // A valid prefix (the second service without its endpoints yet, no
    // pods) while the writer is still at work: every read sees more.
    let prefix_end = TWO_SERVICES
        .find("    endpoints:\n      - address: 127.0.0.1:10")
        .expect("prefix");
    let written = Arc::new(Mutex::new(TWO_SERVICES[..prefix_end].to_string()));
    let writer = Arc::clone(&written);
    let slow_writer = move |_: &Path| {
        let mut text = writer.lock().expect("lock");
        let seen = text.clone();
        let rest = &TWO_SERVICES[seen.len()..];
        // One more line per read, as a slow in-place writer would add.
        let next = rest.find('\n').map_or(rest.len(), |i| i + 1);
        text.push_str(&rest[..next]);
        Ok(seen)
    };
    *rt.watcher.lock().expect("lock") = ConfigWatcher::new(path.clone(), ONE_SERVICE.into())
        .with_reader(Duration::from_millis(1), slow_writer);
    assert!(
        !rt.reload().await,
        "a file still being written is not applied"
    );
    assert_eq!(rt.config, running);

    assert_eq!(
        written.lock().expect("lock").len(),
        TWO_SERVICES.len(),
        "the writer finished meanwhile"
    );

    // The writer is done: the next reload applies the whole file.
    assert!(rt.reload().await, "the complete file applies");
    assert_eq!(service_names(&rt), ["echo", "web"]);
    assert_eq!(rt.config.services[1].endpoints.len(), 2);
    assert_eq!(rt.config.pods.len(), 1);
    assert_eq!(**rt.admin.config.load(), rt.config);
}

/// A config file whose every read takes `stall`, as a settling read
/// sleeps.
fn stall_reads(rt: &mut Runtime, path: &Path, stall: Duration) {
    *rt.watcher.lock().expect("lock") = ConfigWatcher::new(path.to_path_buf(), ONE_SERVICE.into())
        .with_reader(Duration::from_millis(1), move |_| {
            std::thread::sleep(stall);
            Ok(ONE_SERVICE.to_string())
        });
}

/// Counts ticks of a task that wakes every 10 ms, on whatever worker the
/// runtime gives it.
fn spawn_ticker() -> (Arc<AtomicUsize>, JoinHandle<()>) {
    let ticks = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&ticks);
    let ticker = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    (ticks, ticker)
}

/// Ticks of `ticks` while `work` runs.
async fn ticks_during(ticks: &AtomicUsize, work: impl Future<Output = ()>) -> usize {
    let before = ticks.load(Ordering::Relaxed);
    work.await;
    ticks.load(Ordering::Relaxed) - before
}

/// About 50 ticks fit in each stall; 3 leaves room for a very busy
/// machine, while a blocked worker would allow none.
const MIN_TICKS: usize = 3;

/// The agent's case: its run loop (the reload's file reads, which may
/// sleep while a writer settles, and the per-tick work: cgroup walks, map
/// syncs) runs in the future given to `block_on`, like this test's body,
/// on a thread that is not the runtime's (single) worker. Tasks on the
/// worker, the proxy's in the agent, go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_run_loops_blocking_work_holds_up_no_task() {
    let dir = TempDir(std::env::temp_dir().join(format!("dp-runtime-main-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let path = dir.0.join("mesh.yaml");
    let mut rt = runtime_on(&path, ONE_SERVICE).await;
    let stall = Duration::from_millis(500);
    stall_reads(&mut rt, &path, stall);

    let (ticks, ticker) = spawn_ticker();
    let during_reload = ticks_during(&ticks, async {
        rt.reload().await;
    })
    .await;
    let during_tick = ticks_during(&ticks, async {
        off_worker(|| std::thread::sleep(stall));
    })
    .await;
    ticker.abort();
    assert!(
        during_reload >= MIN_TICKS,
        "ticks during the reload: {during_reload}"
    );
    assert!(
        during_tick >= MIN_TICKS,
        "ticks during the tick work: {during_tick}"
    );
}

/// Should the loop be awaited in a spawned task, it runs on a worker: the
/// reload reads on a blocking thread, and [`off_worker`] hands the
/// worker's other tasks over for the tick work. Here one worker runs both
/// the loop's work and a ticking task.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_loops_blocking_work_in_a_task_leaves_its_worker_free() {
    let dir = TempDir(std::env::temp_dir().join(format!("dp-runtime-off-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let path = dir.0.join("mesh.yaml");
    let mut rt = runtime_on(&path, ONE_SERVICE).await;
    let stall = Duration::from_millis(500);
    stall_reads(&mut rt, &path, stall);

    let (ticks, ticker) = spawn_ticker();
    let blocking = tokio::spawn(async move {
        let during_reload = ticks_during(&ticks, async {
            rt.reload().await;
        })
        .await;
        let during_tick = ticks_during(&ticks, async {
            off_worker(|| std::thread::sleep(stall));
        })
        .await;
        (during_reload, during_tick)
    });
    let (during_reload, during_tick) = blocking.await.expect("task");
    ticker.abort();
    assert!(
        during_reload >= MIN_TICKS,
        "ticks during the reload: {during_reload}"
    );
    assert!(
        during_tick >= MIN_TICKS,
        "ticks during the tick work: {during_tick}"
    );
}

/// More connections than the usual backlog of 128 complete their
/// handshake while nothing accepts: a burst is queued, not dropped.
#[tokio::test]
async fn the_listener_queues_a_burst_of_connections() {
    let listener = bind("127.0.0.1:0".parse().expect("addr"), "--test")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut connected = Vec::new();
    for _ in 0..300 {
        let connect = tokio::net::TcpStream::connect(addr);
        let stream = tokio::time::timeout(Duration::from_secs(2), connect)
            .await
            .expect("the handshake completes without an accept")
            .expect("connect");
        connected.push(stream);
    }
    assert_eq!(connected.len(), 300);
}

/// Accepted sockets take their options from the proxy's listener, so the
/// proxy sets none per connection; this holds only if the kernel copies
/// them, which this checks.
#[tokio::test]
async fn proxied_connections_inherit_nodelay_and_keepalive_from_the_listener() {
    let listener = bind_proxy("127.0.0.1:0".parse().unwrap(), "--proxy-addr")
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (_client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (accepted, _) = accepted.unwrap();
    let socket = socket2::SockRef::from(&accepted);
    assert!(socket.tcp_nodelay().unwrap(), "Nagle off");
    assert!(socket.keepalive().unwrap(), "keep-alive on");
    assert_eq!(
        socket.tcp_keepalive_time().unwrap(),
        Duration::from_secs(60)
    );
    assert_eq!(
        socket.tcp_keepalive_interval().unwrap(),
        Duration::from_secs(10)
    );
    assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);

    // The admin listener is left as the kernel makes it.
    let admin = bind("127.0.0.1:0".parse().unwrap(), "--admin-addr")
        .await
        .unwrap();
    let addr = admin.local_addr().unwrap();
    let (_client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), admin.accept());
    let (accepted, _) = accepted.unwrap();
    assert!(!socket2::SockRef::from(&accepted).keepalive().unwrap());
}
