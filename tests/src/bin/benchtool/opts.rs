//! Command-line options: `--key value` pairs only. Hand-rolled like the
//! other test peers', so the benchmark tool carries no argument-parsing
//! dependency and its options read the same way.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

/// Why a subcommand could not run: bad arguments (exit 2, with the usage)
/// or a setup problem such as a refused connect or a port in use (exit 1).
/// Failed requests are not failures: they are reported, the caller judges.
#[derive(Debug)]
pub enum Failure {
    Usage(String),
    Run(String),
}

/// Parsed options of one subcommand.
pub struct Opts {
    values: HashMap<String, String>,
}

impl Opts {
    pub fn parse(args: &[String]) -> Result<Opts, Failure> {
        let mut values = HashMap::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(name) = arg.strip_prefix("--") else {
                return Err(Failure::Usage(format!("unexpected argument {arg:?}")));
            };
            let value = it
                .next()
                .ok_or_else(|| Failure::Usage(format!("{arg} needs a value")))?;
            if values.insert(name.to_owned(), value.clone()).is_some() {
                return Err(Failure::Usage(format!("{arg} given twice")));
            }
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

    pub fn raw(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
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
        assert!(Opts::parse(&args(&["--rate", "1", "--rate", "2"])).is_err());
        assert!(Opts::parse(&args(&["--rate"])).is_err());
        let opts = Opts::parse(&args(&["--rat", "1"])).ok();
        assert!(opts.is_some_and(|o| o.only(&["rate"]).is_err()));
    }
}
