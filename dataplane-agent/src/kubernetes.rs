//! Discovery from the Kubernetes API server: Services, EndpointSlices,
//! Namespaces and this node's Pods, read with kube-rs watchers.
//!
//! - [`convert`]: the objects to the mesh's plain data (pure; tested on
//!   recorded objects).
//! - [`source`]: the watches, the stores they fill, and the state they
//!   publish; an API server outage keeps the last state (its age is a
//!   metric), and every watch relists when the server is back.
//! - [`policy`]: the `TrafficPolicy` custom resource (a Service's traffic
//!   policy), its CRD, and how policies resolve.
//! - [`metrics`]: the `dataplane_kubernetes_*` series.

pub mod convert;
pub mod metrics;
pub mod policy;
pub mod source;

use std::path::PathBuf;

/// Where the API server is and which node this agent serves.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// A kubeconfig file; `None`: the in-cluster service account (or
    /// `KUBECONFIG`, or `~/.kube/config`), as kubectl finds it.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (`spec.nodeName` of its pods).
    pub node: String,
    /// Where the last good state is kept, for a start while the API server
    /// is unreachable; `None`: nowhere.
    pub snapshot: Option<PathBuf>,
    /// A snapshot older than this is not used.
    pub snapshot_max_age: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("cannot use kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes API server configured: not in a pod with a service account, no \
         KUBECONFIG and no ~/.kube/config ({0}); pass --kubeconfig"
    )]
    Infer(kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(kube::Error),
}

/// A client of the API server `cfg` names. Nothing is sent yet: an
/// unreachable server is the watches' business, not a start-up error.
pub async fn client(cfg: &KubernetesConfig) -> Result<kube::Client, KubernetesError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubernetesError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| KubernetesError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(KubernetesError::Infer)?,
    };
    kube::Client::try_from(config).map_err(KubernetesError::Client)
}
