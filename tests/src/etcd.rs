//! A real etcd cluster on a simulated node: each member a process of
//! Debian's `etcd` in its own pod (network namespace) on the node's
//! bridge, so a member can be killed, paused, or cut off from its peers by
//! nftables rules in its namespace, and `etcdctl` (outside the mesh, on
//! the node) reads and writes the registry as an SDK client would.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::{Pod, Proc, SimNode, eventually};

/// Heartbeat and election timeout (ms), as production clusters on a fast
/// network set them.
const HEARTBEAT_MS: &str = "100";
const ELECTION_MS: &str = "1000";

pub struct EtcdCluster {
    pub members: Vec<Member>,
    data: PathBuf,
    /// `root:<password>` once authentication is on: what `etcdctl` uses.
    root: Mutex<Option<String>>,
}

/// An etcd user for [`EtcdCluster::enable_auth`]: name, password, and the
/// key prefixes it may read (`read`) or read and write (`readwrite`).
pub struct EtcdUser<'a> {
    pub name: &'a str,
    pub password: &'a str,
    pub grants: &'a [(&'a str, &'a str)],
}

pub struct Member {
    pub name: String,
    pub pod: Pod,
    /// Behind a lock so that a test can kill and restart members while
    /// another thread uses the cluster.
    proc: Mutex<Option<Proc>>,
    /// Clients speak TLS to it (`https://`).
    tls: bool,
}

impl Member {
    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ip
    }

    pub fn client_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:2379", self.ip())
    }

    fn peer_url(&self) -> String {
        format!("http://{}:2380", self.ip())
    }
}

impl EtcdCluster {
    /// Starts `size` members (pods `etcd1`...) and waits for a leader.
    pub fn start(node: &mut SimNode, size: usize) -> anyhow::Result<EtcdCluster> {
        Self::start_with(node, size, false)
    }

    /// [`EtcdCluster::start`] with TLS for clients: a CA made for the test
    /// ([`EtcdCluster::ca`]) signs each member's certificate for its IP.
    pub fn start_tls(node: &mut SimNode, size: usize) -> anyhow::Result<EtcdCluster> {
        Self::start_with(node, size, true)
    }

    fn start_with(node: &mut SimNode, size: usize, tls: bool) -> anyhow::Result<EtcdCluster> {
        let data = std::env::temp_dir().join(format!("dataplane-etcd-{}", node.id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data)?;
        let mut members = Vec::new();
        for i in 1..=size {
            let name = format!("etcd{i}");
            let pod = node.add_pod(&name)?;
            members.push(Member {
                name,
                pod,
                proc: Mutex::new(None),
                tls,
            });
        }
        if tls {
            make_certificates(&data, &members)?;
        }
        let cluster = EtcdCluster {
            members,
            data,
            root: Mutex::new(None),
        };
        for i in 0..size {
            cluster.spawn(node, i, "new")?;
        }
        cluster.wait_healthy(node)?;
        Ok(cluster)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&self, node: &SimNode, i: usize, state: &str) -> anyhow::Result<()> {
        let initial = self.initial_cluster();
        let member = &self.members[i];
        let dir = self.data.join(&member.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.join(format!("{}.log", member.name)))?;
        let mut cmd = Command::new("etcd");
        cmd.args([
            "--name",
            &member.name,
            "--data-dir",
            &dir.to_string_lossy(),
            "--listen-client-urls",
            &member.client_url(),
            "--advertise-client-urls",
            &member.client_url(),
            "--listen-peer-urls",
            &member.peer_url(),
            "--initial-advertise-peer-urls",
            &member.peer_url(),
            "--initial-cluster",
            &initial,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            "dataplane-test",
            "--heartbeat-interval",
            HEARTBEAT_MS,
            "--election-timeout",
            ELECTION_MS,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
        if member.tls {
            let pem = |ext: &str| self.data.join(format!("{}.{ext}", member.name));
            cmd.arg("--cert-file")
                .arg(pem("pem"))
                .arg("--key-file")
                .arg(pem("key"));
        }
        let proc = node
            .spawn_in_pod(&member.pod, cmd)
            .with_context(|| format!("starting {} (is etcd-server installed?)", member.name))?;
        *self.members[i]
            .proc
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(proc);
        Ok(())
    }

    /// `--etcd-endpoints` for the agent.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Member::client_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `etcdctl` on the node against every member; its stdout.
    pub fn etcdctl(&self, node: &SimNode, args: &[&str]) -> anyhow::Result<String> {
        let root = self
            .root
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        self.run_etcdctl(node, root.as_deref(), args)
    }

    /// Writes many keys: transactions of 100 puts (etcd's default limit of
    /// operations per transaction is 128).
    pub fn put_many(&self, node: &SimNode, pairs: &[(String, String)]) -> anyhow::Result<()> {
        // Under etcd's 1.5 MiB request limit with values of a few KiB.
        for chunk in pairs.chunks(100) {
            let mut script = String::from("\n");
            for (key, value) in chunk {
                // etcdctl's transaction syntax: a double-quoted,
                // backslash-escaped value.
                let quoted = value.replace('\\', "\\\\").replace('"', "\\\"");
                script.push_str(&format!("put {key} \"{quoted}\"\n"));
            }
            script.push_str("\n\n");
            let path = self.data.join("txn.txt");
            std::fs::write(&path, script)?;
            let root = self
                .root
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(format!(
                "ETCDCTL_API=3 etcdctl --endpoints={} {} txn < {}",
                self.endpoints(),
                root.map(|r| format!("--user={r}")).unwrap_or_default(),
                path.display()
            ));
            let out = node.run_on_node(cmd, Duration::from_secs(20))?;
            if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("SUCCESS") {
                bail!(
                    "etcdctl txn: {} {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }

    /// Runs `etcdctl` as `user:password`; its stdout.
    pub fn etcdctl_as(&self, node: &SimNode, user: &str, args: &[&str]) -> anyhow::Result<String> {
        self.run_etcdctl(node, Some(user), args)
    }

    /// Turns authentication on with a root user and `users`, each with a
    /// role of its own holding its grants. `etcdctl` acts as root after.
    pub fn enable_auth(&self, node: &SimNode, users: &[EtcdUser<'_>]) -> anyhow::Result<()> {
        let root_password = "root-secret";
        self.etcdctl(node, &["user", "add", &format!("root:{root_password}")])?;
        self.etcdctl(node, &["user", "grant-role", "root", "root"])?;
        for user in users {
            let role = format!("role-{}", user.name);
            self.etcdctl(node, &["role", "add", &role])?;
            for (permission, prefix) in user.grants {
                self.etcdctl(
                    node,
                    &[
                        "role",
                        "grant-permission",
                        &role,
                        permission,
                        "--prefix=true",
                        prefix,
                    ],
                )?;
            }
            self.etcdctl(
                node,
                &["user", "add", &format!("{}:{}", user.name, user.password)],
            )?;
            self.etcdctl(node, &["user", "grant-role", user.name, &role])?;
        }
        self.etcdctl(node, &["auth", "enable"])?;
        *self.root.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(format!("root:{root_password}"));
        Ok(())
    }

    fn run_etcdctl(
        &self,
        node: &SimNode,
        user: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<String> {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints()))
            .args(["--dial-timeout=1s", "--command-timeout=3s"]);
        if let Some(user) = user {
            cmd.arg(format!("--user={user}"));
        }
        if self.members.iter().any(|m| m.tls) {
            cmd.arg(format!("--cacert={}", self.ca().display()));
        }
        cmd.args(args);
        let out = node.run_on_node(cmd, Duration::from_secs(10))?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until a majority answers a write.
    pub fn wait_healthy(&self, node: &SimNode) -> anyhow::Result<()> {
        eventually("an etcd leader", Duration::from_secs(20), || {
            self.etcdctl(node, &["put", "/health-check", "ok"])
                .map(|_| ())
        })
    }

    /// The index of the current leader.
    pub fn leader(&self, node: &SimNode) -> anyhow::Result<usize> {
        let text = self.etcdctl(node, &["endpoint", "status", "-w", "json"])?;
        let statuses: Vec<serde_json::Value> = serde_json::from_str(&text)?;
        for status in statuses {
            let endpoint = status["Endpoint"].as_str().unwrap_or_default();
            let member = status["Status"]["header"]["member_id"].as_u64();
            let leader = status["Status"]["leader"].as_u64();
            if member.is_some() && member == leader {
                return self
                    .members
                    .iter()
                    .position(|m| m.client_url() == endpoint)
                    .context("leader endpoint not a member");
            }
        }
        bail!("no member reports itself as leader")
    }

    /// SIGKILLs member `i`.
    pub fn kill(&self, i: usize) -> anyhow::Result<()> {
        let taken = self.members[i]
            .proc
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut proc) = taken {
            proc.kill()?;
        }
        Ok(())
    }

    /// Starts member `i` again with its data (it rejoins).
    pub fn restart(&self, node: &SimNode, i: usize) -> anyhow::Result<()> {
        self.kill(i)?;
        self.spawn(node, i, "existing")
    }

    /// Cuts member `i` off from the other members (its peers' traffic
    /// dropped in its namespace); clients still reach it.
    pub fn partition(&self, node: &SimNode, i: usize) -> anyhow::Result<()> {
        let peers: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, m)| m.ip().to_string())
            .collect();
        let peers = peers.join(", ");
        let rules = format!(
            "table inet partition {{\n\
             chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {peers} }} drop; }}\n\
             chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {peers} }} drop; }}\n\
             }}\n"
        );
        self.nft(node, i, &["-f", "-"], Some(&rules))
    }

    /// Undoes [`EtcdCluster::partition`].
    pub fn heal(&self, node: &SimNode, i: usize) -> anyhow::Result<()> {
        self.nft(node, i, &["delete", "table", "inet", "partition"], None)
    }

    fn nft(
        &self,
        node: &SimNode,
        i: usize,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut cmd = Command::new("nft");
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut proc = node.spawn_in_pod(&self.members[i].pod, cmd)?;
        if let Some(text) = stdin {
            let mut child = proc.child_mut();
            if let Some(mut input) = child.stdin.take() {
                input.write_all(text.as_bytes())?;
            }
        } else {
            drop(proc.child_mut().stdin.take());
        }
        let out = proc.output_timeout(Duration::from_secs(10))?;
        if !out.status.success() {
            bail!("nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The members' logs, for a failing test's message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = std::fs::read_to_string(self.data.join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                format!("{}: {}", m.name, tail.join(" | "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl EtcdCluster {
    /// The CA of a TLS cluster (PEM), for `--etcd-ca`.
    pub fn ca(&self) -> PathBuf {
        self.data.join("ca.pem")
    }
}

/// A CA, and per member a key and a certificate for its IP signed by it
/// (`<name>.key`, `<name>.pem`), with the `openssl` command line.
fn make_certificates(dir: &std::path::Path, members: &[Member]) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=dataplane-test-ca",
    ]);
    openssl(&ca)?;
    for m in members {
        let (key, csr, pem, ext) = (
            format!("{}.key", m.name),
            format!("{}.csr", m.name),
            format!("{}.pem", m.name),
            format!("{}.ext", m.name),
        );
        std::fs::write(dir.join(&ext), format!("subjectAltName=IP:{}\n", m.ip()))?;
        let subject = format!("/CN={}", m.name);
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(&req)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ])?;
    }
    Ok(())
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            let _ = self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
