//! `cargo xtask`: the one entry point for building, testing and demoing the
//! data plane. Every command that needs tools installs them first (`setup`
//! is idempotent), so a fresh machine needs nothing done by hand.

// A failed step must end with a message saying what to fix, not a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![deny(clippy::dbg_macro, clippy::todo, clippy::unimplemented)]

mod setup;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo the sidecarless data plane")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (nightly rust-src, bpf-linker,
    /// apt packages). Safe to run again.
    Setup,
    /// Build the agent (with its eBPF programs) and the test tools.
    Build,
    /// Run every test: unit tests and the end-to-end tests on simulated
    /// nodes. These are `#[ignore]`d (needs root) and included when run as
    /// root or with CI=true, where they fail rather than skip.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Formatting, clippy (host crates and the eBPF crate; warnings
    /// denied) and cargo-deny (licenses, bans, sources). Needs no root.
    Lint,
    /// Build a simulated node with a client pod and three backend pods, and
    /// show the client calling a service VIP through the node proxy.
    Demo,
    /// Benchmark direct, node proxy, our sidecars and HAProxy sidecars on
    /// the same work (release build); report in target/bench/.
    Bench {
        /// Every mode briefly, checking only that each moves bytes
        /// correctly (for CI).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::ensure_all(),
        Task::Build => {
            setup::ensure_all()?;
            build()
        }
        Task::Test { args } => {
            setup::ensure_all()?;
            build()?;
            test(&args)
        }
        Task::Lint => {
            setup::ensure_build_tools()?;
            setup::ensure_cargo_deny()?;
            lint()
        }
        Task::Bench { quick } => {
            setup::ensure_all()?;
            run(cargo().current_dir(workspace_root()).args([
                "build",
                "--release",
                "-p",
                "dataplane-agent",
                "-p",
                "dataplane-tests",
                "--bins",
            ]))?;
            let release = target_dir()?.join("release");
            let mut bench = Command::new(release.join("dataplane-bench"));
            bench
                .current_dir(workspace_root())
                .env("DATAPLANE_AGENT_BIN", release.join("dataplane-agent"))
                .args(["--out", &target_dir()?.join("bench").to_string_lossy()]);
            if quick {
                bench.arg("--quick");
            }
            run(&mut bench)
        }
        Task::Demo => {
            setup::ensure_all()?;
            build()?;
            let demo = target_dir()?.join("debug/dataplane-demo");
            run(Command::new(demo).env("DATAPLANE_AGENT_BIN", agent_bin()?))
        }
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    with_cargo_bin_on_path(&mut cmd);
    cmd
}

/// Makes sure tools installed by `cargo install` (bpf-linker) are found by
/// child processes, even where CARGO_HOME/bin is not on PATH (e.g. sudo).
fn with_cargo_bin_on_path(cmd: &mut Command) {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"));
    if let Some(bin) = cargo_bin {
        let mut paths = vec![bin];
        paths.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        if let Ok(joined) = std::env::join_paths(paths) {
            cmd.env("PATH", joined);
        }
    }
}

/// Runs a command, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Absolute, so that paths derived from it work from any directory.
fn target_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    Ok(workspace_root().join(dir))
}

fn agent_bin() -> anyhow::Result<PathBuf> {
    Ok(target_dir()?.join("debug/dataplane-agent"))
}

fn build() -> anyhow::Result<()> {
    run(cargo().current_dir(workspace_root()).args([
        "build",
        "-p",
        "dataplane-agent",
        "-p",
        "dataplane-cni",
        "-p",
        "dataplane-tests",
        "--bins",
    ]))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    let privileged = is_root() || std::env::var("CI").is_ok_and(|v| v == "true");
    if !privileged {
        eprintln!(
            "xtask: not root and CI is not true: the end-to-end tests (simulated nodes) \
             will show as ignored"
        );
    }
    run(cargo()
        .current_dir(workspace_root())
        .env("DATAPLANE_AGENT_BIN", agent_bin()?)
        .args(["test", "--workspace", "--exclude", "dataplane-ebpf"])
        .args(test_args(extra, privileged)))
}

/// The arguments after `cargo test --workspace ...`: the user's, plus
/// `--include-ignored` for the test harness when the privileged tests can
/// (or, under CI, must) run. They are `#[ignore]`d so that a run without
/// root reports them as ignored rather than as passed; the user's own
/// arguments may already hold a `--` with harness arguments of their own.
fn test_args(extra: &[String], privileged: bool) -> Vec<String> {
    let mut args = extra.to_vec();
    if !privileged
        || args
            .iter()
            .any(|a| a == "--include-ignored" || a == "--ignored")
    {
        return args;
    }
    match args.iter().position(|a| a == "--") {
        Some(dashes) => args.insert(dashes + 1, "--include-ignored".into()),
        None => args.extend(["--".into(), "--include-ignored".into()]),
    }
    args
}

/// Whether this process runs with effective uid 0, read from
/// `/proc/self/status` (`Uid: real effective saved fs`).
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
            uids.split_whitespace().nth(1).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

fn lint() -> anyhow::Result<()> {
    let root = workspace_root();
    // Licenses, banned crates and sources (deny.toml); advisories need a
    // network fetch of the advisory database, so they are not part of it.
    run(cargo()
        .current_dir(&root)
        .args(["deny", "check", "licenses", "bans", "sources"]))?;
    run(cargo()
        .current_dir(&root)
        .args(["fmt", "--all", "--", "--check"]))?;
    run(cargo()
        .current_dir(root.join("dataplane-ebpf"))
        .args(["fmt", "--", "--check"]))?;
    // The eBPF crate is left out here: it only builds for the bpf target.
    run(cargo()
        .current_dir(&root)
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "dataplane-ebpf",
            "--all-targets",
        ])
        .args(["--", "-D", "warnings"]))?;
    // The eBPF crate, for the bpf target with nightly. `cargo run` leaves the stable toolchain in the environment; clear it
    // so that nightly's cargo, rustc and clippy-driver are used throughout.
    let mut nightly = Command::new("rustup");
    with_cargo_bin_on_path(&mut nightly);
    run(nightly
        .current_dir(root.join("dataplane-ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .env_remove("RUSTC_WRAPPER")
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
            "--release",
            "--",
            "-D",
            "warnings",
        ]))
}

#[cfg(test)]
mod tests {
    use super::test_args;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn privileged_runs_include_the_ignored_tests() {
        assert_eq!(test_args(&[], true), args(&["--", "--include-ignored"]));
        assert_eq!(
            test_args(&args(&["-p", "dataplane-tests"]), true),
            args(&["-p", "dataplane-tests", "--", "--include-ignored"])
        );
    }

    #[test]
    fn harness_arguments_of_the_user_are_kept_after_one_dash_dash() {
        assert_eq!(
            test_args(
                &args(&["--test", "capture", "--", "--nocapture", "restart"]),
                true
            ),
            args(&[
                "--test",
                "capture",
                "--",
                "--include-ignored",
                "--nocapture",
                "restart"
            ])
        );
        // An explicit choice of the user stands.
        assert_eq!(
            test_args(&args(&["--", "--ignored"]), true),
            args(&["--", "--ignored"])
        );
    }

    #[test]
    fn unprivileged_runs_are_left_alone() {
        assert_eq!(test_args(&args(&["x"]), false), args(&["x"]));
    }
}
