//! The node agent of the sidecarless data plane, as a library: the binary
//! (`main.rs`) only parses the command line and calls [`app::run`].
//!
//! Layout by responsibility: [`capture`] (eBPF programs, pinning,
//! enrollment), [`proxy`] (listeners, TCP and HTTP forwarding), the pure
//! policies [`balance`], [`health`] (outlier detection), [`resilience`]
//! (retries, budgets, circuit breakers) and [`ratelimit`], the mesh state
//! ([`config`], [`state`], [`reload`]), and [`admin`]/[`metrics`].

pub mod admin;
pub mod app;
pub mod balance;
pub mod capture;
pub mod config;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod resilience;
pub mod sidecar;
pub mod state;
pub mod upstream;
