//! Installs `dataplane-cni` on the node and keeps it in the node's network
//! configuration, so that the DaemonSet is all an operator installs.
//!
//! A container runtime runs the network configuration that sorts first
//! by file name in its configuration directory (`/etc/cni/net.d`): the
//! cluster's network plugin (Calico, Cilium, flannel...) writes it. The
//! agent adds an entry for `dataplane-cni` at the end of that file's
//! chain, and puts it back whenever the network plugin rewrites the file
//! (they do on their own upgrades), on every periodic pass. The plugin's
//! binary is copied next to the other plugins. Both are written to a
//! temporary file first and renamed, so a runtime never reads half a file.
//!
//! Uninstalling (`dataplane-agent cleanup`) removes the entry and the
//! binary. Stopping the agent leaves both: during an upgrade, pods keep
//! being enrolled at creation by the next agent (with `failPolicy:
//! closed`, a pod created while no agent answers is retried by the
//! runtime, never started uncaptured).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugin's name: the binary's, and `type` in its entry.
pub const PLUGIN: &str = "dataplane-cni";

/// What an installer pass found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// Entry and binary were already in place.
    Unchanged { config: PathBuf },
    /// Something was written.
    Written { config: PathBuf, what: String },
    /// No network configuration yet (the network plugin has not written
    /// one): nothing to add to; looked for again at the next pass.
    NoNetwork,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: not a CNI network configuration ({message}); left as it is, so pods on this \
         node are not enrolled at creation until it is fixed"
    )]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where and what to install.
#[derive(Debug, Clone)]
pub struct Installer {
    /// The runtime's configuration directory, as the agent sees it.
    pub conf_dir: PathBuf,
    /// The runtime's plugin directory, as the agent sees it.
    pub bin_dir: PathBuf,
    /// The plugin binary to copy there.
    pub plugin: PathBuf,
    /// The agent's socket, as the node sees it (the plugin runs on the
    /// node, outside the agent's container).
    pub socket: PathBuf,
    /// `closed` or `open`.
    pub fail_policy: String,
}

impl Installer {
    /// One pass: the binary copied if it differs, the entry added to (or
    /// brought up to date in) the primary network configuration.
    pub fn ensure(&self) -> Result<Installed, InstallError> {
        let mut what = Vec::new();
        if self.install_binary()? {
            what.push(format!("copied {}", self.bin_dir.join(PLUGIN).display()));
        }
        let Some(config) = primary_config(&self.conf_dir)? else {
            return Ok(Installed::NoNetwork);
        };
        let text = std::fs::read_to_string(&config).map_err(io(&config))?;
        let parsed: Value = serde_json::from_str(&text).map_err(|err| InstallError::Invalid {
            path: config.clone(),
            message: err.to_string(),
        })?;
        let config = match with_entry(parsed, self.entry()) {
            Err(message) => {
                return Err(InstallError::Invalid {
                    path: config,
                    message,
                });
            }
            Ok(None) => config,
            Ok(Some(updated)) => {
                // A single-plugin `.conf` becomes a `.conflist` of the same
                // name, which sorts right after it and replaces it.
                let target = if is_list(&config) {
                    config.clone()
                } else {
                    config.with_extension("conflist")
                };
                write_atomically(&target, pretty(&updated).as_bytes(), mode_of(&config))?;
                if target != config {
                    std::fs::remove_file(&config).map_err(io(&config))?;
                }
                what.push(format!("added {PLUGIN} to {}", target.display()));
                target
            }
        };
        Ok(if what.is_empty() {
            Installed::Unchanged { config }
        } else {
            Installed::Written {
                config,
                what: what.join("; "),
            }
        })
    }

    fn entry(&self) -> Value {
        json!({
            "type": PLUGIN,
            "agentSocket": self.socket.to_string_lossy(),
            "failPolicy": self.fail_policy,
        })
    }

    /// Copies the plugin unless the installed one has the same bytes.
    fn install_binary(&self) -> Result<bool, InstallError> {
        let ours = std::fs::read(&self.plugin).map_err(io(&self.plugin))?;
        let target = self.bin_dir.join(PLUGIN);
        if std::fs::read(&target).is_ok_and(|installed| installed == ours) {
            return Ok(false);
        }
        write_atomically(&target, &ours, 0o755)?;
        Ok(true)
    }
}

/// Runs [`Installer::ensure`] on every periodic pass of the agent, logs
/// what changes (not the same state at every pass) and keeps the
/// `dataplane_cni_installed` gauge.
pub struct Keeper {
    installer: Installer,
    installed: prometheus_client::metrics::gauge::Gauge,
    last: Option<String>,
}

impl Keeper {
    pub fn new(installer: Installer, installed: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self {
            installer,
            installed,
            last: None,
        }
    }

    pub fn pass(&mut self) {
        let outcome = self.installer.ensure();
        self.installed.set(i64::from(matches!(
            outcome,
            Ok(Installed::Unchanged { .. } | Installed::Written { .. })
        )));
        let said = match &outcome {
            Ok(Installed::Unchanged { config }) => format!("in {}", config.display()),
            Ok(Installed::Written { what, .. }) => what.clone(),
            Ok(Installed::NoNetwork) => "no network configuration".into(),
            Err(err) => err.to_string(),
        };
        let repeated = self.last.as_ref() == Some(&said);
        match outcome {
            Ok(Installed::Written { .. }) => tracing::info!("CNI plugin: {said}"),
            _ if repeated => {}
            Ok(Installed::Unchanged { .. }) => tracing::info!("CNI plugin in place: {said}"),
            Ok(Installed::NoNetwork) => tracing::warn!(
                dir = %self.installer.conf_dir.display(),
                "no CNI network configuration yet (the cluster's network plugin writes one): \
                 dataplane-cni is added once there is; until then new pods are enrolled by \
                 the cgroup watcher only"
            ),
            Err(_) => tracing::warn!("cannot install the CNI plugin: {said}"),
        }
        self.last = Some(said);
    }
}

/// The configuration file a runtime uses: the first by name of the
/// `.conflist`, `.conf` and `.json` files (as libcni lists them).
pub fn primary_config(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    Ok(config_files(dir)?.into_iter().next())
}

fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(io(dir)(err)),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'));
            let ext = p.extension().and_then(|e| e.to_str());
            !hidden && matches!(ext, Some("conflist" | "conf" | "json")) && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

fn is_list(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("conflist")
}

/// `config` with `entry` last in its chain: `None` when it is there
/// already, as it is. An entry with other settings is replaced in place.
fn with_entry(mut config: Value, entry: Value) -> Result<Option<Value>, String> {
    let Some(object) = config.as_object_mut() else {
        return Err("not a JSON object".into());
    };
    if let Some(plugins) = object.get_mut("plugins") {
        let Some(plugins) = plugins.as_array_mut() else {
            return Err("\"plugins\" is not a list".into());
        };
        let ours = plugins
            .iter()
            .position(|p| p.get("type").and_then(Value::as_str) == Some(PLUGIN));
        match ours {
            Some(i) if plugins[i] == entry => return Ok(None),
            Some(i) => plugins[i] = entry,
            None => plugins.push(entry),
        }
        return Ok(Some(config));
    }
    // A single plugin's configuration (`.conf`): made a list of it and ours.
    if object.get("type").and_then(Value::as_str).is_none() {
        return Err("neither \"plugins\" nor \"type\"".into());
    }
    let version = object.get("cniVersion").cloned().unwrap_or(json!("0.3.1"));
    let name = object
        .get("name")
        .cloned()
        .unwrap_or(json!("k8s-pod-network"));
    Ok(Some(json!({
        "cniVersion": version,
        "name": name,
        "plugins": [config, entry],
    })))
}

/// Removes the entry from every configuration in `conf_dir` and the binary
/// from `bin_dir`. Returns the files changed.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for path in config_files(conf_dir)? {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let Ok(mut config) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let Some(plugins) = config.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN));
        if plugins.len() != before {
            write_atomically(&path, pretty(&config).as_bytes(), mode_of(&path))?;
            changed.push(path);
        }
    }
    let binary = bin_dir.join(PLUGIN);
    match std::fs::remove_file(&binary) {
        Ok(()) => changed.push(binary),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(io(&binary)(err)),
    }
    Ok(changed)
}

/// A configuration file's permissions, kept when it is rewritten.
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777)
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

/// Writes `path` through a hidden temporary file in the same directory
/// and a rename: readers see the old file or the new one, never a part.
/// A symbolic link is written through (its target is replaced). The
/// temporary file is this process's own: during an upgrade two agents run
/// on the node.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = &std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = path.with_file_name(format!(".{name}.dataplane-tmp.{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        // The mode asked for, whatever the umask.
        std::fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        std::fs::rename(&temp, path)
    })();
    written.map_err(|err| {
        let _ = std::fs::remove_file(&temp);
        io(path)(err)
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A node's directories, removed when dropped.
    struct Node {
        dir: PathBuf,
        installer: Installer,
    }

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn node() -> Node {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dataplane-cni-install-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let conf_dir = dir.join("net.d");
        let bin_dir = dir.join("bin");
        std::fs::create_dir_all(&conf_dir).unwrap();
        std::fs::create_dir_all(&bin_dir).unwrap();
        let plugin = dir.join("plugin-build");
        std::fs::write(&plugin, b"plugin v1").unwrap();
        Node {
            installer: Installer {
                conf_dir,
                bin_dir,
                plugin,
                socket: "/run/dataplane/cni.sock".into(),
                fail_policy: "closed".into(),
            },
            dir,
        }
    }

    const FLANNEL: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn read(path: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn types(config: &Value) -> Vec<String> {
        config["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn the_entry_goes_last_in_the_first_configuration_and_the_binary_beside_the_plugins() {
        let n = node();
        let conf = n.installer.conf_dir.join("10-flannel.conflist");
        std::fs::write(&conf, FLANNEL).unwrap();
        std::fs::write(n.installer.conf_dir.join("99-other.conflist"), FLANNEL).unwrap();
        let done = n.installer.ensure().unwrap();
        assert!(
            matches!(&done, Installed::Written { config, .. } if *config == conf),
            "{done:?}"
        );
        let config = read(&conf);
        assert_eq!(types(&config), ["flannel", "portmap", PLUGIN]);
        assert_eq!(
            config["plugins"][2]["agentSocket"],
            "/run/dataplane/cni.sock"
        );
        assert_eq!(config["plugins"][2]["failPolicy"], "closed");
        assert_eq!(
            config["plugins"][0]["delegate"]["hairpinMode"], true,
            "the rest kept"
        );
        assert_eq!(
            types(&read(&n.installer.conf_dir.join("99-other.conflist"))),
            ["flannel", "portmap"]
        );
        let binary = n.installer.bin_dir.join(PLUGIN);
        assert_eq!(std::fs::read(&binary).unwrap(), b"plugin v1");
        assert_eq!(
            std::fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // Idempotent.
        assert_eq!(
            n.installer.ensure().unwrap(),
            Installed::Unchanged {
                config: conf.clone()
            }
        );
        assert_eq!(types(&read(&conf)), ["flannel", "portmap", PLUGIN]);
    }

    #[test]
    fn a_configuration_keeps_its_permissions_and_a_link_is_written_through() {
        let n = node();
        let real = n.installer.conf_dir.join("real.json.txt");
        std::fs::write(&real, FLANNEL).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = n.installer.conf_dir.join("10-flannel.conflist");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        n.installer.ensure().unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(types(&read(&real)), ["flannel", "portmap", PLUGIN]);
        assert_eq!(
            std::fs::metadata(&real).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = std::fs::read_dir(&n.installer.conf_dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains("dataplane-tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_rewritten_configuration_a_new_binary_and_new_settings_are_caught_up_with() {
        let mut n = node();
        let conf = n.installer.conf_dir.join("10-flannel.conflist");
        std::fs::write(&conf, FLANNEL).unwrap();
        n.installer.ensure().unwrap();
        // The network plugin's own upgrade writes its file again.
        std::fs::write(&conf, FLANNEL).unwrap();
        std::fs::write(&n.installer.plugin, b"plugin v2").unwrap();
        let done = n.installer.ensure().unwrap();
        let Installed::Written { what, .. } = done else {
            panic!("{done:?}")
        };
        assert!(what.contains("copied") && what.contains("added"), "{what}");
        assert_eq!(types(&read(&conf)), ["flannel", "portmap", PLUGIN]);
        assert_eq!(
            std::fs::read(n.installer.bin_dir.join(PLUGIN)).unwrap(),
            b"plugin v2"
        );
        n.installer.fail_policy = "open".into();
        n.installer.ensure().unwrap();
        let config = read(&conf);
        assert_eq!(
            types(&config),
            ["flannel", "portmap", PLUGIN],
            "replaced, not added twice"
        );
        assert_eq!(config["plugins"][2]["failPolicy"], "open");
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list_and_no_configuration_is_waited_for() {
        let n = node();
        assert_eq!(n.installer.ensure().unwrap(), Installed::NoNetwork);
        let conf = n.installer.conf_dir.join("10-bridge.conf");
        std::fs::write(
            &conf,
            r#"{"cniVersion":"1.0.0","name":"net","type":"bridge","bridge":"cni0"}"#,
        )
        .unwrap();
        // Files a runtime ignores are ignored.
        std::fs::write(n.installer.conf_dir.join("00-notes.txt"), "x").unwrap();
        std::fs::write(n.installer.conf_dir.join(".00-hidden.conflist"), "x").unwrap();
        n.installer.ensure().unwrap();
        assert!(!conf.exists());
        let list = read(&n.installer.conf_dir.join("10-bridge.conflist"));
        assert_eq!(list["cniVersion"], "1.0.0");
        assert_eq!(list["name"], "net");
        assert_eq!(types(&list), ["bridge", PLUGIN]);
        assert_eq!(list["plugins"][0]["bridge"], "cni0");
    }

    #[test]
    fn a_broken_configuration_is_reported_and_left_alone() {
        let n = node();
        let conf = n.installer.conf_dir.join("10-net.conflist");
        std::fs::write(&conf, "{ not json").unwrap();
        let err = n.installer.ensure().unwrap_err().to_string();
        assert!(
            err.contains("10-net.conflist") && err.contains("not a CNI network configuration"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "{ not json");
        std::fs::write(&conf, r#"{"plugins": 3}"#).unwrap();
        let err = n.installer.ensure().unwrap_err().to_string();
        assert!(err.contains("\"plugins\" is not a list"), "{err}");
    }

    #[test]
    fn uninstall_removes_the_entry_everywhere_and_the_binary() {
        let n = node();
        let conf = n.installer.conf_dir.join("10-flannel.conflist");
        std::fs::write(&conf, FLANNEL).unwrap();
        n.installer.ensure().unwrap();
        let changed = uninstall(&n.installer.conf_dir, &n.installer.bin_dir).unwrap();
        assert_eq!(changed.len(), 2, "{changed:?}");
        assert_eq!(read(&conf), serde_json::from_str::<Value>(FLANNEL).unwrap());
        assert!(!n.installer.bin_dir.join(PLUGIN).exists());
        assert!(
            uninstall(&n.installer.conf_dir, &n.installer.bin_dir)
                .unwrap()
                .is_empty()
        );
    }
}
