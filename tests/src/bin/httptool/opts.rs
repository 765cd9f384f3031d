//! Command-line options: `--key value` pairs, a few value-less flags and
//! repeatable keys (`--header`). Hand-rolled like meshtool's, so the test
//! peers carry no argument-parsing dependency.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

/// Options that take no value.
const FLAGS: &[&str] = &["http2"];
/// Options that may be given more than once.
const REPEATABLE: &[&str] = &["header"];

/// Why a subcommand could not run: bad arguments (exit 2, with the
/// usage) or a local problem such as a port in use (exit 1). Failed
/// requests are not failures: they are reported and the caller judges.
#[derive(Debug)]
pub enum Failure {
    Usage(String),
    Run(String),
}

/// Parsed options of one subcommand.
pub struct Opts {
    values: HashMap<String, Vec<String>>,
}

impl Opts {
    pub fn parse(args: &[String]) -> Result<Opts, Failure> {
        let mut values: HashMap<String, Vec<String>> = HashMap::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(name) = arg.strip_prefix("--") else {
                return Err(Failure::Usage(format!("unexpected argument {arg:?}")));
            };
            let value = if FLAGS.contains(&name) {
                String::new()
            } else {
                it.next()
                    .ok_or_else(|| Failure::Usage(format!("{arg} needs a value")))?
                    .clone()
            };
            let entry = values.entry(name.to_owned()).or_default();
            if !entry.is_empty() && !REPEATABLE.contains(&name) {
                return Err(Failure::Usage(format!("{arg} given twice")));
            }
            entry.push(value);
        }
        Ok(Opts { values })
    }

    /// Rejects options the subcommand does not know (catches typos).
    pub fn only(&self, allowed: &[&str]) -> Result<(), Failure> {
        match self.values.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(key) => Err(Failure::Usage(format!("unknown option --{key}"))),
            None => Ok(()),
        }
    }

    /// The raw value of a single-valued option.
    pub fn raw(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    /// Every value of a repeatable option, in order.
    pub fn all(&self, key: &str) -> &[String] {
        self.values.get(key).map(Vec::as_slice).unwrap_or_default()
    }

    pub fn flag(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// A required option parsed as `T`.
    pub fn get<T: FromStr>(&self, key: &str) -> Result<T, Failure> {
        let value = self
            .raw(key)
            .ok_or_else(|| Failure::Usage(format!("--{key} is required")))?;
        value
            .parse()
            .map_err(|_| Failure::Usage(format!("--{key}: invalid value {value:?}")))
    }

    /// An optional option parsed as `T`, `default` when absent.
    pub fn get_or<T: FromStr>(&self, key: &str, default: T) -> Result<T, Failure> {
        match self.raw(key) {
            Some(_) => self.get(key),
            None => Ok(default),
        }
    }

    /// An optional duration (`300ms`, `2s`), `default` when absent.
    pub fn duration_or(&self, key: &str, default: Duration) -> Result<Duration, Failure> {
        match self.raw(key) {
            Some(value) => parse_duration(value)
                .ok_or_else(|| Failure::Usage(format!("--{key}: invalid duration {value:?}"))),
            None => Ok(default),
        }
    }
}

/// `<n>ms` or `<n>s`. A unit is required so that `--max-duration 30`
/// cannot silently mean 30 ms to one reader and 30 s to another.
pub fn parse_duration(text: &str) -> Option<Duration> {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    let secs = text.strip_suffix('s')?;
    secs.parse().ok().map(Duration::from_secs)
}

/// Formats a duration the way [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}
