//! Unit tests, one file per submodule. All deterministic: seeded rngs, zero-jitter backoff and
//! explicit `now` offsets from a single `Instant`.

mod backoff;
mod breaker;
mod budget;
mod retry;
mod retry_state;

/// Parses YAML the way the product's config loader does.
fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
}
