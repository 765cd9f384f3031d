//! Config parsing: defaults, the documented example, and rejected configs.

use std::time::Duration;

use crate::balance::{Algorithm, HashSource, LoadBalancerConfig};

fn parse(yaml: &str) -> Result<LoadBalancerConfig, String> {
    serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
}

fn rejected(yaml: &str, expected: &str) {
    match parse(yaml) {
        Ok(c) => panic!("{yaml:?} accepted as {c:?}"),
        Err(e) => assert!(e.contains(expected), "{yaml:?}: {e:?} lacks {expected:?}"),
    }
}

#[test]
fn empty_mapping_gives_defaults() {
    let c = parse("{}").unwrap();
    assert_eq!(c, LoadBalancerConfig::default());
    assert_eq!(c.algorithm, Algorithm::LeastRequest);
    assert_eq!(c.choice_count, 2);
    assert_eq!(c.ring_size, 1024);
    assert_eq!(c.maglev_table_size, 65537);
    assert!(!c.locality.enabled);
    assert_eq!(c.locality.overprovisioning_factor, 140.0);
    assert_eq!(c.panic_threshold, 50.0);
    assert_eq!(c.peak_ewma.decay, Duration::from_secs(10));
    assert_eq!(c.peak_ewma.default_rtt, Duration::from_millis(30));
    assert_eq!(c.hash.source(), None);
}

#[test]
fn documented_example_parses() {
    let c = parse(
        "algorithm: maglev\nchoiceCount: 3\nhash:\n  header: x-user\nringSize: 2048\n\
         maglevTableSize: 251\npeakEwma:\n  decay: 5s\n  defaultRtt: 250ms\n\
         locality:\n  enabled: true\n  overprovisioningFactor: 120\npanicThreshold: 0\n",
    )
    .unwrap();
    assert_eq!(c.algorithm, Algorithm::Maglev);
    assert_eq!(c.choice_count, 3);
    assert_eq!(c.hash.source(), Some(HashSource::Header("x-user")));
    assert_eq!(c.ring_size, 2048);
    assert_eq!(c.maglev_table_size, 251);
    assert_eq!(c.peak_ewma.decay, Duration::from_secs(5));
    assert_eq!(c.peak_ewma.default_rtt, Duration::from_millis(250));
    assert!(c.locality.enabled);
    assert_eq!(c.locality.overprovisioning_factor, 120.0);
    assert_eq!(c.panic_threshold, 0.0);
    let ip = parse("algorithm: ringHash\nhash: {sourceIp: true}").unwrap();
    assert_eq!(ip.hash.source(), Some(HashSource::SourceIp));
}

#[test]
fn every_algorithm_name_parses() {
    for (name, algo) in [
        ("roundRobin", Algorithm::RoundRobin),
        ("random", Algorithm::Random),
        ("leastRequest", Algorithm::LeastRequest),
        ("peakEwma", Algorithm::PeakEwma),
    ] {
        assert_eq!(
            parse(&format!("algorithm: {name}")).unwrap().algorithm,
            algo
        );
    }
    rejected("algorithm: leastConn", "unknown variant");
}

#[test]
fn serialization_round_trips() {
    let c =
        parse("algorithm: ringHash\nhash: {header: x-user}\nlocality: {enabled: true}").unwrap();
    let yaml = serde_yaml_ng::to_string(&c).unwrap();
    assert_eq!(parse(&yaml).unwrap(), c);
}

#[test]
fn unknown_fields_are_rejected() {
    rejected("algoritm: random", "unknown field `algoritm`");
    rejected(
        "locality: {enabled: true, factor: 2}",
        "unknown field `factor`",
    );
    rejected("hash: {cookie: x}", "unknown field `cookie`");
    rejected("peakEwma: {tau: 1s}", "unknown field `tau`");
}

#[test]
fn invalid_values_are_rejected_with_the_field_name() {
    rejected("maglevTableSize: 65536", "maglevTableSize: must be a prime");
    rejected("maglevTableSize: 1", "maglevTableSize");
    rejected("maglevTableSize: 5000077", "maglevTableSize");
    rejected("choiceCount: 1", "choiceCount: must be between 2 and 16");
    rejected("choiceCount: 17", "choiceCount");
    rejected(
        "locality: {overprovisioningFactor: 0}",
        "overprovisioningFactor: must be",
    );
    rejected(
        "locality: {overprovisioningFactor: -5}",
        "overprovisioningFactor",
    );
    rejected(
        "panicThreshold: 100.5",
        "panicThreshold: must be a percentage",
    );
    rejected("ringSize: 0", "ringSize: must be between");
    rejected("ringSize: 9000000", "ringSize");
    rejected("peakEwma: {decay: 0s}", "decay: must be > 0");
    rejected("peakEwma: {decay: soon}", "peakEwma");
    rejected(
        "hash: {header: x-user, sourceIp: true}",
        "header: mutually exclusive",
    );
    rejected(
        "hash: {header: 'bad header'}",
        "header: must be a non-empty",
    );
    rejected("hash: {header: ''}", "header: must be a non-empty");
    rejected("algorithm: ringHash", "hash: ringHash and maglev need");
    rejected(
        "algorithm: maglev\nhash: {}",
        "hash: ringHash and maglev need",
    );
}

/// Why validation lives in `try_from`: embedded in a larger document (as the product's
/// policy file will be) the parser reports where the bad value is.
#[test]
fn errors_point_at_the_line_when_embedded() {
    #[derive(serde::Deserialize, Debug)]
    struct Policy {
        #[serde(rename = "trafficPolicy")]
        _traffic: TrafficPolicy,
    }
    #[derive(serde::Deserialize, Debug)]
    struct TrafficPolicy {
        #[serde(rename = "loadBalancer")]
        _lb: LoadBalancerConfig,
    }
    let yaml = "trafficPolicy:\n  loadBalancer:\n    algorithm: random\n    choiceCount: 1\n";
    let e = serde_yaml_ng::from_str::<Policy>(yaml)
        .unwrap_err()
        .to_string();
    assert!(e.contains("choiceCount: must be between"), "{e}");
    assert!(e.contains("line 2"), "{e}");
}
