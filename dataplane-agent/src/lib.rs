//! The node agent of the sidecarless data plane, as a library: the binary
//! (`main.rs`) only parses the command line and calls [`app::run`].
//!
//! Layout by responsibility: [`capture`] (eBPF programs, pinning,
//! enrollment), [`proxy`] (listeners, TCP and HTTP forwarding), the pure
//! policies [`balance`], [`health`] (outlier detection), [`resilience`]
//! (retries, budgets, circuit breakers) and [`ratelimit`], the mesh state
//! ([`config`], [`state`], [`reload`]), its sources beside the file
//! ([`discovery`]: the service [`registry`] and [`kubernetes`]), and
//! [`admin`]/[`metrics`].

// Outside input must never panic the agent: product code handles errors
// instead of unwrapping them (tests may unwrap; see clippy.toml).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![deny(clippy::dbg_macro, clippy::todo, clippy::unimplemented)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod capture;
pub mod cni;
pub mod config;
pub mod discovery;
pub mod health;
pub mod kubernetes;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod registry;
pub mod reload;
pub mod resilience;
pub mod sidecar;
pub mod state;
pub mod upstream;
