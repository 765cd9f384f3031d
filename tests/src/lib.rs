//! End-to-end test support for the data plane.
//!
//! The data plane can only be tested for real on a node: eBPF programs
//! attached to cgroups, pods in their own network namespaces, one node
//! proxy. We have no Kubernetes here, so [`simnode`] builds a node out of
//! Linux namespaces and cgroup v2 directories named like kubelet's, and
//! the `meshtool` binary is the blocking, std-only peer (server, hello
//! client, bulk transfer) that runs inside it.
//!
//! Network rule (see the design notes): everything stays inside network
//! namespaces created here or on loopback, the node namespace has no route
//! out, and every wait is bounded in time.

pub mod agent;
pub mod bench;
pub mod bench_peers;
pub mod binaries;
pub mod bpfmaps;
pub mod cni;
pub mod etcd;
pub mod http_peers;
pub mod kubeapi;
pub mod peers;
pub mod proc;
pub mod scenario;
pub mod sidecar;
pub mod simnode;
pub mod wait;

pub use proc::Proc;
pub use simnode::{Pod, SimNode, require_privileges};
pub use wait::eventually;
