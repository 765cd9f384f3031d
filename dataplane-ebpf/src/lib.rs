//! Empty on purpose: the programs live in the `dataplane` binary target,
//! which `dataplane-agent`'s build script compiles for the bpf target. This
//! library only lets the agent name the crate as a build-dependency, so that
//! cargo rebuilds the agent when the programs change.
#![no_std]
