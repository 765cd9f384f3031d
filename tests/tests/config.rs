//! End-to-end: the agent refuses a bad config at start, naming the field
//! and the line, before touching the node. Needs no privileges.

use std::process::Command;

use dataplane_tests::binaries;

const GOOD: &str = "\
services:
  - name: echo
    vip: 198.19.0.10:80
    endpoints:
      - address: 198.18.0.11:8080
pods:
  - uid: 7d1e
";

/// Runs `dataplane-agent run` on `yaml`; returns its stderr. The agent must
/// fail: with a valid config it would go on to need root and namespaces.
fn start_with(yaml: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("dp-config-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let out = Command::new(binaries::agent().expect("agent binary"))
        .args([
            "run",
            "--proxy-addr=127.0.0.1:1",
            "--pin-dir=/nonexistent/dp/x",
        ])
        .arg(format!("--config={}", path.display()))
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run agent");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "a bad config must stop the agent");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_rejected(yaml: &str, wants: &[&str]) {
    let stderr = start_with(yaml);
    for want in wants {
        assert!(
            stderr.contains(want),
            "stderr should mention {want:?}:\n{stderr}"
        );
    }
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let yaml = GOOD.replace("    endpoints:", "    endpoint:");
    assert_rejected(
        &yaml,
        &["services[0]", "unknown field `endpoint`", "line 4"],
    );
}

#[test]
fn wrong_type_is_named_with_its_line() {
    let yaml = GOOD.replace("  - name: echo", "  - name: {first: echo}");
    assert_rejected(&yaml, &["services[0].name", "invalid type", "line 2"]);
}

#[test]
fn invalid_address_is_named_with_its_line() {
    let yaml = GOOD.replace("198.19.0.10:80", "198.19.0.10");
    assert_rejected(
        &yaml,
        &["services[0].vip", "invalid IPv4 socket address", "line 3"],
    );
}

#[test]
fn check_config_accepts_the_good_one() {
    let dir = std::env::temp_dir().join(format!("dp-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, GOOD).expect("write");
    let out = Command::new(binaries::agent().expect("agent binary"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 services, 1 enrolled pods)"));
}

/// The README's "Running the agent" example is what a new user copies
/// first: `check-config` accepts it as printed.
#[test]
fn the_readme_example_config_is_valid() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split("## Running the agent")
        .nth(1)
        .expect("a Running the agent section");
    let example = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a yaml example");
    let dir = std::env::temp_dir().join(format!("dp-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, example).expect("write");
    let out = Command::new(binaries::agent().expect("agent binary"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("check-config");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}\n{example}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 services, 1 enrolled pods)"));
}
