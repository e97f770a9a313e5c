//! Types shared by several resources: status and conditions, workload selectors, durations and
//! string matches. Everything here is plain data plus schema; no I/O.

use std::{borrow::Cow, collections::BTreeMap, fmt, str::FromStr};

use kube::KubeSchema;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// Condition type that is `True` when the resource is fully in effect.
pub const CONDITION_READY: &str = "Ready";
/// Condition type that is `True` while the controller is still converging.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type that is `True` when something is wrong that the user must fix.
pub const CONDITION_DEGRADED: &str = "Degraded";

/// The status every policy kind reports: what the control plane saw of the latest generation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The `metadata.generation` that the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (the policy is in effect), `Degraded` (it refers to something that does not exist or
    /// conflicts with another policy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Selects workloads (pods) in the resource's namespace by their labels.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Pods whose labels contain all of these pairs are selected.
    #[x_kube(validation = Rule::new("self.size() > 0").message(
        "matchLabels must name at least one label; leave out the selector to apply to the whole namespace"
    ))]
    pub match_labels: BTreeMap<String, String>,
}

/// A duration in Go/Kubernetes notation (`250ms`, `10s`, `1m30s`, `24h`). Always positive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(pub String);

/// The pattern the API server checks; [`Duration::parse`] accepts exactly this language.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 32,
            "pattern": DURATION_PATTERN,
            "x-kubernetes-validations": [{
                "rule": "duration(self) > duration('0s')",
                "message": "must be a positive duration such as 500ms, 10s, 1m30s or 24h"
            }]
        })
    }
}

/// Why a duration string was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError(pub String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid duration {:?}: use a number with a unit (ms, s, m, h), e.g. 500ms or 1m30s",
            self.0
        )
    }
}

impl std::error::Error for DurationError {}

impl Duration {
    /// Parses the string into a [`std::time::Duration`].
    pub fn parse(&self) -> Result<std::time::Duration, DurationError> {
        parse_duration(&self.0)
    }
}

impl From<&str> for Duration {
    fn from(s: &str) -> Self {
        Duration(s.to_string())
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Duration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s)?;
        Ok(Duration(s.to_string()))
    }
}

/// Parses `1h30m`, `250ms`, `1.5s`, … (the subset of Go's notation our schema admits).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, DurationError> {
    let err = || DurationError(s.to_string());
    if s.is_empty() {
        return Err(err());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
        if num_len == 0 {
            return Err(err());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let (unit, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return Err(err());
        };
        total += value * unit;
        rest = &rest[len..];
    }
    if total <= 0.0 || !total.is_finite() {
        return Err(err());
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

/// Matches a string exactly, by prefix, or by an RE2 regular expression: exactly one of the three.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.exact), has(self.prefix), has(self.regex)].filter(x, x).size() == 1"
).message("set exactly one of exact, prefix or regex"))]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub prefix: Option<String>,
    /// An RE2 regular expression that must match the whole value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub regex: Option<String>,
}

/// Matches one named header (or query parameter): exactly one of exact, prefix, regex or present.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.exact), has(self.prefix), has(self.regex), has(self.present)].filter(x, x).size() == 1"
).message("set exactly one of exact, prefix, regex or present"))]
pub struct NamedMatch {
    /// The header or query parameter name (case-insensitive for headers).
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub regex: Option<String>,
    /// `true`: the name must be present (any value); `false`: it must be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// Log verbosity of a Mycel component.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("1m30s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("1.5h").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("24h").unwrap().as_secs(), 86400);
        for bad in ["", "10", "s", "-1s", "0s", "1d", "1 s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn duration_error_says_how_to_fix() {
        let e = parse_duration("5 minutes").unwrap_err().to_string();
        assert!(e.contains("5 minutes") && e.contains("1m30s"), "{e}");
    }
}
