//! The proxy's request path tested in-process: the real proxy on loopback
//! sockets with test backends (and, in `real_clients`, real clients and
//! servers), no root needed. One test binary for all of them: each binary
//! links the whole agent, so one per file cost a link and about 100 MiB of
//! disk each.
//!
//! Run one area with a filter, e.g. `cargo test -p dataplane-agent --test
//! proxy features_retry::`.

mod support;

mod access_log;
mod defaults;
mod drain;
mod features_admin;
mod features_balance;
mod features_errors;
mod features_outlier;
mod features_ratelimit;
mod features_retry;
mod features_timeouts;
mod kubernetes;
mod opaque_and_detection;
mod profile;
mod real_clients;
mod request_path;
mod tenants;
