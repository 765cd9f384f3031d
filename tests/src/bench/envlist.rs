//! The benchmark's narrowing variables (`DATAPLANE_BENCH_ONLY`, `_MODES`,
//! `_WORKLOADS`): comma-separated names, each one the run knows.

use anyhow::{bail, ensure};

/// The names in `list`, the value of `var`, each one of `known`: an
/// unknown name, or none at all, is an error that lists what `var` takes.
pub fn names<'a>(var: &str, list: &'a str, known: &[&str]) -> anyhow::Result<Vec<&'a str>> {
    let mut names = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !known.contains(&name) {
            bail!("{var}: unknown name {name:?} ({})", known.join(", "));
        }
        names.push(name);
    }
    ensure!(
        !names.is_empty(),
        "{var} names nothing ({})",
        known.join(", ")
    );
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::names;

    #[test]
    fn a_list_takes_only_known_names() {
        let known = ["a", "b"];
        assert_eq!(names("V", " a, b ,", &known).unwrap(), ["a", "b"]);
        let unknown = names("V", "a,c", &known).unwrap_err().to_string();
        assert!(
            unknown.contains("\"c\"") && unknown.contains("a, b"),
            "{unknown}"
        );
        assert!(names("V", " , ", &known).is_err());
    }
}
