//! Pieces of sidecar mode that are not the proxy itself.

pub mod redirect;
