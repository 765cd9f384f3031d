//! Idempotent installation of the build and test prerequisites.
//!
//! - the nightly toolchain with `rust-src` (the eBPF crate builds `core`),
//!   and the clippy/rustfmt components lint uses;
//! - `bpf-linker`, built against the LLVM inside the nightly toolchain, so
//!   that its LLVM always matches the one rustc emits bitcode for;
//! - the Debian packages the simulated node and the tests use;
//! - the Python packages the tests' Python clients import;
//! - `kubectl` (for `kubectl kustomize`) and `kubernetes-validate`, which
//!   the manifests test renders and validates `deploy/` with.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::run;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the simulated node, the tests and the benchmark use,
/// each with what needs it.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "`ip`: namespaces, veths and routes of every simulated node",
    ),
    (
        "bpftool",
        "attachments and map contents (capture and dualstack tests)",
    ),
    ("nftables", "`nft`: sidecar mode's redirects"),
    ("haproxy", "the benchmark's peer sidecar"),
    (
        "procps",
        "`sysctl`: IPv6 settings inside pods (dualstack test)",
    ),
    (
        "curl",
        "a real HTTP client: dialling `[::ffff:<VIP>]` (dualstack), h1 and h2c (real_clients)",
    ),
    (
        "python3",
        "the dualstack test's AF_INET6 client, opened as Java and gRPC do",
    ),
    (
        "python3-grpcio",
        "real gRPC servers and client through the proxy (real_clients test)",
    ),
    (
        "python3-websockets",
        "a real WebSocket client and server through the proxy (real_clients test)",
    ),
    (
        "nghttp2-client",
        "`h2load`: a real HTTP/2 client load through the proxy (real_clients test)",
    ),
    (
        "containernetworking-plugins",
        "the real CNI plugins (`bridge`, `host-local`) chained with dataplane-cni (cni test)",
    ),
    (
        "etcd-server",
        "`etcd`: the 3-member registry cluster of the registry tests",
    ),
    (
        "etcd-client",
        "`etcdctl`: a client outside the mesh writing and reading the registry (registry tests)",
    ),
    (
        "openssl",
        "`openssl`: the test CA and member certificates of the registry's TLS test",
    ),
    (
        "python3-venv",
        "the venv kubernetes-validate is installed in (manifests test): Debian's python is externally managed",
    ),
];

/// kubernetes-validate (PyPI) and its dependencies, pinned so that a new
/// release cannot change what the manifests test accepts. 1.37.0 ships the
/// OpenAPI schemas of Kubernetes 1.25 to 1.37.
const KUBERNETES_VALIDATE: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.4",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
];

pub fn ensure_all() -> anyhow::Result<()> {
    ensure_build_tools()?;
    ensure_apt_packages()?;
    ensure_kubectl()?;
    ensure_kubernetes_validate()
}

/// What building and linting need: toolchains and bpf-linker, installed
/// per user (rustup, cargo install), so `cargo xtask lint` needs no root.
pub fn ensure_build_tools() -> anyhow::Result<()> {
    ensure_toolchains()?;
    ensure_bpf_linker()?;
    ensure_protoc()
}

/// protoc, which the etcd client's build script runs on etcd's gRPC
/// definitions. Installed from Debian when missing and running as root;
/// otherwise the error says what to install.
fn ensure_protoc() -> anyhow::Result<()> {
    let works = || {
        std::env::var_os("PROTOC").is_some()
            || output(Command::new("protoc").arg("--version")).is_ok()
    };
    if works() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "protoc is missing (the etcd client's build needs it): install Debian's \
             protobuf-compiler (or set PROTOC), or run this as root and it is installed"
        );
    }
    eprintln!("setup: installing protobuf-compiler (protoc, for the etcd client's build)");
    apt_install(&["protobuf-compiler"])?;
    if !works() {
        bail!("protobuf-compiler was installed but protoc does not run");
    }
    Ok(())
}

/// cargo-deny, which `cargo xtask lint` runs with `deny.toml`. Pinned, so
/// a new release cannot change what CI accepts.
pub const CARGO_DENY_VERSION: &str = "0.20.2";

pub fn ensure_cargo_deny() -> anyhow::Result<()> {
    let ok = || {
        // "cargo-deny 0.20.2": the exact version, not a prefix of it.
        output(Command::new("cargo").args(["deny", "--version"]))
            .is_ok_and(|v| v.split_whitespace().nth(1) == Some(CARGO_DENY_VERSION))
    };
    if ok() {
        return Ok(());
    }
    eprintln!("setup: building cargo-deny {CARGO_DENY_VERSION} (a few minutes, once)");
    run(Command::new("cargo").env_remove("RUSTC").args([
        "install",
        "cargo-deny",
        "--locked",
        "--force",
        "--no-default-features",
        "--version",
        CARGO_DENY_VERSION,
    ]))?;
    if !ok() {
        bail!("cargo-deny was installed but does not run; is CARGO_HOME/bin on PATH?");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The nightly toolchain (the eBPF crate needs `-Z build-std`) with the
/// components the build and lint use, and the stable toolchain's lints.
/// Only installs what is missing: an existing nightly is never updated,
/// since a newer one may ship an LLVM the pinned bpf-linker does not know.
fn ensure_toolchains() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("the eBPF programs need a nightly toolchain")?;
    }
    for (toolchain, components) in [
        ("nightly", &["rust-src", "clippy", "rustfmt"][..]),
        ("stable", &["clippy", "rustfmt"][..]),
    ] {
        let installed = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))
        .unwrap_or_default();
        let missing: Vec<&str> = components
            .iter()
            .copied()
            .filter(|c| !installed.lines().any(|line| line.starts_with(c)))
            .collect();
        if !missing.is_empty() {
            eprintln!("setup: adding {} to {toolchain}", missing.join(" "));
            run(Command::new("rustup")
                .args(["component", "add", "--toolchain", toolchain])
                .args(&missing))?;
        }
    }
    Ok(())
}

/// The LLVM shared library shipped in the nightly toolchain and its major.
fn nightly_llvm() -> anyhow::Result<(PathBuf, String)> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV reports no LLVM version")?
        .to_string();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
        })
        .with_context(|| format!("no libLLVM in {}", lib_dir.display()))?;
    Ok((lib, major))
}

/// bpf-linker keeps an rpath to this prefix: it must outlive the build, so
/// it lives in CARGO_HOME, not in target/.
fn llvm_prefix(major: &str) -> anyhow::Result<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    Ok(cargo_home.join("dataplane-llvm").join(major))
}

fn bpf_linker_ok() -> bool {
    output(Command::new("bpf-linker").arg("--version"))
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_ok() {
        return Ok(());
    }
    let (llvm_lib, major) = nightly_llvm()?;
    let prefix = llvm_prefix(&major)?;
    // An installed bpf-linker may only miss its library link (a toolchain
    // update renamed it): relinking is enough then.
    link_llvm(&llvm_lib, &prefix.join("lib"))?;
    if bpf_linker_ok() {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (a few minutes, once)"
    );
    run(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTC")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ]))?;
    if !bpf_linker_ok() {
        bail!("bpf-linker was installed but does not run; is CARGO_HOME/bin on PATH?");
    }
    Ok(())
}

/// Makes `lib_dir` hold `libLLVM.so` (what bpf-linker's build looks for)
/// and the library's own file name (its soname, what the loader looks for
/// through bpf-linker's rpath), both pointing into the toolchain.
fn link_llvm(llvm_lib: &Path, lib_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(lib_dir)?;
    let own_name = llvm_lib
        .file_name()
        .context("libLLVM path has no file name")?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), own_name] {
        let link = lib_dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(llvm_lib, &link)
            .with_context(|| format!("linking {} to {}", link.display(), llvm_lib.display()))?;
    }
    Ok(())
}

fn ensure_apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|&(pkg, _why)| pkg)
        .filter(|pkg| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output()
                .is_ok_and(|out| {
                    String::from_utf8_lossy(&out.stdout).contains("install ok installed")
                })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    apt_install(&missing)
}

/// `apt-get install` of `packages` (after an update of the lists), with
/// no prompt and no recommended extras.
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages))
}

/// `kubectl kustomize` renders deploy/ for the manifests test. Any kubectl
/// already on PATH is kept (Debian's is old, 1.20, and its package would
/// replace an existing /usr/bin/kubectl); only without one is Debian's
/// kubernetes-client installed: its kustomize (2.0.3) renders deploy/ as
/// today's does.
fn ensure_kubectl() -> anyhow::Result<()> {
    let works = || output(Command::new("kubectl").args(["kustomize", "--help"])).is_ok();
    if works() {
        return Ok(());
    }
    eprintln!("setup: installing kubernetes-client (kubectl, for the manifests test)");
    apt_install(&["kubernetes-client"])?;
    if !works() {
        bail!("kubernetes-client was installed but `kubectl kustomize` does not run");
    }
    Ok(())
}

/// Where the manifests test finds kubernetes-validate: a venv in the
/// target directory (tests/tests/manifests.rs looks there).
fn kubernetes_validate_venv() -> anyhow::Result<PathBuf> {
    Ok(crate::target_dir()?.join("tools/kubernetes-validate"))
}

/// kubernetes-validate in its own venv (Debian's python refuses `pip
/// install` into the system): created, or recreated when the pins above
/// changed, from the pin list recorded beside it.
fn ensure_kubernetes_validate() -> anyhow::Result<()> {
    let venv = kubernetes_validate_venv()?;
    let stamp = venv.join("dataplane-pins.txt");
    let pins = KUBERNETES_VALIDATE.join("\n");
    let installed = std::fs::read_to_string(&stamp).is_ok_and(|text| text == pins)
        && output(Command::new(venv.join("bin/kubernetes-validate")).arg("--version")).is_ok();
    if installed {
        return Ok(());
    }
    eprintln!(
        "setup: installing {} in {}",
        KUBERNETES_VALIDATE[0],
        venv.display()
    );
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(KUBERNETES_VALIDATE))?;
    std::fs::write(&stamp, pins).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}
