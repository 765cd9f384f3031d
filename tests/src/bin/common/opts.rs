//! Command-line options of the test tools (`httptool`, `benchtool`):
//! `--key value` pairs, value-less flags and repeatable keys, as each tool
//! declares them. Hand-rolled like meshtool's, so the test peers carry no
//! argument-parsing dependency. Included by each tool with `#[path]`.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

/// Why a subcommand could not run: bad arguments (exit 2, with the
/// usage) or a local problem such as a refused connect or a port in use
/// (exit 1). Failed requests are not failures: they are reported and the
/// caller judges.
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
    /// `flags` take no value; `repeatable` may be given more than once;
    /// any other option given twice is an error.
    pub fn parse(args: &[String], flags: &[&str], repeatable: &[&str]) -> Result<Opts, Failure> {
        let mut values: HashMap<String, Vec<String>> = HashMap::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(name) = arg.strip_prefix("--") else {
                return Err(Failure::Usage(format!("unexpected argument {arg:?}")));
            };
            let value = if flags.contains(&name) {
                String::new()
            } else {
                it.next()
                    .ok_or_else(|| Failure::Usage(format!("{arg} needs a value")))?
                    .clone()
            };
            let entry = values.entry(name.to_owned()).or_default();
            if !entry.is_empty() && !repeatable.contains(&name) {
                return Err(Failure::Usage(format!("{arg} given twice")));
            }
            entry.push(value);
        }
        Ok(Opts { values })
    }

    /// Rejects options the subcommand does not know (catches typos, which
    /// in a benchmark would silently measure something else).
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

    /// A required number within `range` (bounds keep every run small).
    pub fn bounded<T>(&self, key: &str, range: std::ops::RangeInclusive<T>) -> Result<T, Failure>
    where
        T: FromStr + PartialOrd + std::fmt::Display,
    {
        check_range(key, self.get(key)?, &range)
    }

    /// As [`Opts::bounded`], `default` when absent.
    pub fn bounded_or<T>(
        &self,
        key: &str,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, Failure>
    where
        T: FromStr + PartialOrd + std::fmt::Display,
    {
        check_range(key, self.get_or(key, default)?, &range)
    }

    /// A span of time in seconds (see [`parse_seconds`]), at most `max`.
    pub fn seconds_or(
        &self,
        key: &str,
        default: Option<Duration>,
        max: Duration,
    ) -> Result<Duration, Failure> {
        let value = match (self.raw(key), default) {
            (Some(text), _) => parse_seconds(text)
                .ok_or_else(|| Failure::Usage(format!("--{key}: invalid duration {text:?}")))?,
            (None, Some(default)) => default,
            (None, None) => return Err(Failure::Usage(format!("--{key} is required"))),
        };
        if value > max {
            return Err(Failure::Usage(format!(
                "--{key} must be at most {}s",
                max.as_secs()
            )));
        }
        Ok(value)
    }
}

fn check_range<T>(key: &str, value: T, range: &std::ops::RangeInclusive<T>) -> Result<T, Failure>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        return Ok(value);
    }
    Err(Failure::Usage(format!(
        "--{key} must be {}..={}, got {value}",
        range.start(),
        range.end()
    )))
}

/// Seconds, fractions allowed (`2`, `0.5`), or with a unit (`2s`,
/// `500ms`). Bare numbers are seconds because benchmark windows are
/// seconds long; `bench_peers` reads them the same way to size its budget.
pub fn parse_seconds(text: &str) -> Option<Duration> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else {
        (text.strip_suffix('s').unwrap_or(text), 1.0)
    };
    let value: f64 = number.parse().ok()?;
    Duration::try_from_secs_f64(value * scale).ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_seconds("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_seconds("3s"), Some(Duration::from_secs(3)));
        assert_eq!(parse_seconds("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_seconds("-1"), None);
        assert_eq!(parse_seconds("x"), None);
        assert_eq!(parse_seconds("NaN"), None);
    }

    #[test]
    fn repeated_and_unknown_options_are_rejected() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(Opts::parse(&args(&["--rate", "1", "--rate", "2"]), &[], &[]).is_err());
        assert!(Opts::parse(&args(&["--rate"]), &[], &[]).is_err());
        let opts = Opts::parse(&args(&["--rat", "1"]), &[], &[]).ok();
        assert!(opts.is_some_and(|o| o.only(&["rate"]).is_err()));
    }
}
