//! The field ledger (`docs/reference/field-ledger.yaml`): for each kind, which `spec` fields do
//! what the reference says — each with the test that proves it — and which are accepted but do
//! nothing yet. From it come the admission warnings a user sees (`kubectl` prints them) when a
//! resource sets a field that is not implemented: a `ValidatingAdmissionPolicy` per kind with
//! `validationActions: [Warn]`, installed with the CRDs, so it warns with or without a running
//! control plane. A test (`crds/tests/ledger.rs`) fails when a leaf of a CRD is in neither
//! list, in both, or when a named test does not exist.
//!
//! A path names a leaf of the CRD's `spec` schema, with `[]` for list items and `{}` for the
//! values of a map of objects: `spec.http[].fault.abort.httpStatus`, `spec.hosts[]`. A map of
//! scalars is a leaf itself: `spec.selector.matchLabels`.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// The ledger as committed.
pub const LEDGER_YAML: &str = include_str!("../../docs/reference/field-ledger.yaml");

/// The ledger: one top-level key per kind (`TrafficRoute: {implemented: …, not_yet: […]}`),
/// and `annotations` for the `mycel.io/*` pod and namespace annotations and labels.
#[derive(Deserialize, Debug)]
pub struct Ledger {
    pub annotations: Fields,
    /// By kind (`TrafficRoute`, …).
    #[serde(flatten)]
    pub kinds: BTreeMap<String, Fields>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct Fields {
    /// Field path → the test that proves it, as `<test target>::<function>` (an integration
    /// test file's name) or `<crate>::<module path>::<function>` (a unit test).
    #[serde(default)]
    pub implemented: BTreeMap<String, String>,
    #[serde(default)]
    pub not_yet: Vec<String>,
}

/// The committed ledger; it is checked by a test, so a parse failure is a bug of the commit.
pub fn ledger() -> Ledger {
    serde_yaml::from_str(LEDGER_YAML).expect("docs/reference/field-ledger.yaml parses (crds/tests/ledger.rs)")
}

/// One leaf of a CRD's `spec` schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Leaf {
    pub path: String,
    /// The schema's default for it, if any (a defaulted field is "set" on every object).
    pub default: Option<Value>,
}

/// The leaves of `crd`'s `spec`, in schema order.
pub fn leaves(crd: &CustomResourceDefinition) -> Vec<Leaf> {
    let mut out = Vec::new();
    let spec = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| s.properties.as_ref())
        .and_then(|p| p.get("spec"));
    if let Some(spec) = spec {
        walk(spec, "spec".into(), &mut out);
    }
    out
}

fn walk(s: &JSONSchemaProps, path: String, out: &mut Vec<Leaf>) {
    if let Some(props) = s.properties.as_ref().filter(|p| !p.is_empty()) {
        for (k, v) in props {
            walk(v, format!("{path}.{k}"), out);
        }
        return;
    }
    if s.type_.as_deref() == Some("array")
        && let Some(JSONSchemaPropsOrArray::Schema(items)) = &s.items
    {
        return walk(items, format!("{path}[]"), out);
    }
    // A map of objects goes on into its values (`{}`); a map of scalars (labels, resource
    // quantities) is itself the leaf, as a list of scalars is (`[]`).
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = &s.additional_properties
        && values.properties.as_ref().is_some_and(|p| !p.is_empty())
    {
        return walk(values, format!("{path}{{}}"), out);
    }
    out.push(Leaf { path, default: s.default.as_ref().map(|d| d.0.clone()) });
}

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Field(String),
    Items,
    Values,
}

fn segments(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let mut name = part;
        let mut tail = Vec::new();
        loop {
            if let Some(n) = name.strip_suffix("[]") {
                tail.push(Seg::Items);
                name = n;
            } else if let Some(n) = name.strip_suffix("{}") {
                tail.push(Seg::Values);
                name = n;
            } else {
                break;
            }
        }
        out.push(Seg::Field(name.to_string()));
        out.extend(tail.into_iter().rev());
    }
    out
}

/// CEL's reserved words are escaped as `__word__` in field selections (Kubernetes' rule).
fn cel_field(name: &str) -> String {
    const RESERVED: &[&str] = &[
        "true",
        "false",
        "null",
        "in",
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    ];
    if RESERVED.contains(&name) { format!("__{name}__") } else { name.to_string() }
}

fn cel_literal(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        other => other.to_string(),
    }
}

/// A CEL expression that holds when the object does not set the field at `segs` (or sets it to
/// its default), below `base`.
fn unset(base: &str, segs: &[Seg], default: Option<&Value>, depth: usize) -> String {
    let Some((Seg::Field(f), rest)) = segs.split_first() else { return "true".into() };
    let field = format!("{base}.{}", cel_field(f));
    let absent = format!("!has({field})");
    // A trailing `[]` or `{}` (a list or map of scalars): the field itself is the leaf.
    let rest: &[Seg] = if rest.iter().all(|s| matches!(s, Seg::Items | Seg::Values)) { &[] } else { rest };
    match rest {
        [] => match default {
            Some(d) => format!("({absent} || {field} == {})", cel_literal(d)),
            None => absent,
        },
        [Seg::Items, more @ ..] => {
            let v = format!("i{depth}");
            format!("({absent} || {field}.all({v}, {}))", unset(&v, more, default, depth + 1))
        }
        [Seg::Values, more @ ..] => {
            let k = format!("k{depth}");
            let inner = unset(&format!("{field}[{k}]"), more, default, depth + 1);
            format!("({absent} || {field}.all({k}, {inner}))")
        }
        more => format!("({absent} || {})", unset(&field, more, default, depth + 1)),
    }
}

/// The CEL expression that holds when `object` does not set `leaf` (or sets its default).
pub fn unset_expression(leaf: &Leaf) -> String {
    let segs = segments(&leaf.path);
    // `object.spec…`: the first segment is `spec`.
    unset("object", &segs, leaf.default.as_ref(), 0)
}

/// Whether `object` sets the field at `segs` to something other than its default (the same
/// test as [`unset_expression`], on a JSON object).
fn is_set(v: &Value, segs: &[Seg], default: Option<&Value>) -> bool {
    let Some((Seg::Field(f), rest)) = segs.split_first() else { return false };
    let Some(field) = v.get(f).filter(|x| !x.is_null()) else { return false };
    let rest: &[Seg] = if rest.iter().all(|s| matches!(s, Seg::Items | Seg::Values)) { &[] } else { rest };
    match rest {
        [] => default != Some(field),
        [Seg::Items, more @ ..] => {
            field.as_array().is_some_and(|a| a.iter().any(|i| is_set(i, more, default)))
        }
        [Seg::Values, more @ ..] => {
            field.as_object().is_some_and(|m| m.values().any(|i| is_set(i, more, default)))
        }
        more => is_set(field, more, default),
    }
}

/// A kind's `not_yet` fields, each with the schema default its check needs: computed once from
/// the CRD, so that checking an object needs neither the CRD nor the ledger in memory.
#[derive(Clone, Debug, Default)]
pub struct NotYet {
    fields: Vec<(String, Vec<Seg>, Option<Value>)>,
}

impl NotYet {
    pub fn of(ledger: &Ledger, crd: &CustomResourceDefinition) -> NotYet {
        let Some(fields) = ledger.kinds.get(&crd.spec.names.kind) else { return NotYet::default() };
        let all = leaves(crd);
        let fields = fields
            .not_yet
            .iter()
            .map(|path| {
                let default = all.iter().find(|l| &l.path == path).and_then(|l| l.default.clone());
                (path.clone(), segments(path), default)
            })
            .collect();
        NotYet { fields }
    }

    /// The fields `object` (the whole resource, as JSON) sets, in ledger order.
    pub fn set_by(&self, object: &Value) -> Vec<String> {
        self.fields
            .iter()
            .filter(|(_, segs, default)| is_set(object, segs, default.as_ref()))
            .map(|(path, _, _)| path.clone())
            .collect()
    }
}

/// The `not_yet` fields of `kind` that `object` (the whole resource, as JSON) sets, in ledger
/// order: what its status names as not implemented.
pub fn not_yet_set(ledger: &Ledger, crd: &CustomResourceDefinition, object: &Value) -> Vec<String> {
    NotYet::of(ledger, crd).set_by(object)
}

/// One ValidatingAdmissionPolicy and its binding per kind with fields not yet implemented:
/// each such field set on a resource is a warning naming it. Returned as one YAML document
/// stream, for `config/crd/`.
pub fn warning_policies(ledger: &Ledger, crds: &[CustomResourceDefinition]) -> String {
    let mut docs = Vec::new();
    for crd in crds {
        let kind = &crd.spec.names.kind;
        let Some(fields) = ledger.kinds.get(kind) else { continue };
        if fields.not_yet.is_empty() {
            continue;
        }
        let all = leaves(crd);
        let validations: Vec<Value> = fields
            .not_yet
            .iter()
            .filter_map(|p| all.iter().find(|l| &l.path == p))
            .map(|leaf| {
                json!({
                    "expression": unset_expression(leaf),
                    "message": format!(
                        "{} is not implemented yet: it is accepted but does not do what the reference says (docs/reference/field-ledger.yaml lists what does)",
                        leaf.path
                    ),
                })
            })
            .collect();
        let plural = &crd.spec.names.plural;
        let name = format!("mycel-not-implemented-{plural}");
        docs.extend(warning_policy(&name, crate::GROUP, crate::VERSION, plural, None, validations));
    }
    yaml_documents(&docs)
}

/// A ValidatingAdmissionPolicy `name` that only warns, with its binding: `validations` on every
/// create and update of `plural` in `group`/`version` (those `match_condition`, a named CEL
/// expression, selects when given).
pub fn warning_policy(
    name: &str,
    group: &str,
    version: &str,
    plural: &str,
    match_condition: Option<(&str, &str)>,
    validations: Vec<Value>,
) -> [Value; 2] {
    let mut spec = json!({
        "failurePolicy": "Ignore",
        "matchConstraints": {"resourceRules": [{
            "apiGroups": [group],
            "apiVersions": [version],
            "operations": ["CREATE", "UPDATE"],
            "resources": [plural],
        }]},
        "validations": validations,
    });
    if let Some((condition, expression)) = match_condition {
        spec["matchConditions"] = json!([{"name": condition, "expression": expression}]);
    }
    [
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": spec,
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Warn"]}
        }),
    ]
}

/// YAML documents, `---` between them.
pub fn yaml_documents(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).expect("JSON values serialise to YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(path: &str, default: Option<Value>) -> Leaf {
        Leaf { path: path.into(), default }
    }

    #[test]
    fn paths_become_cel_that_holds_only_when_the_field_is_unset() {
        assert_eq!(
            unset_expression(&leaf("spec.host", None)),
            "(!has(object.spec) || !has(object.spec.host))"
        );
        assert_eq!(
            unset_expression(&leaf("spec.http[].fault.abort.httpStatus", None)),
            "(!has(object.spec) || (!has(object.spec.http) || object.spec.http.all(i1, (!has(i1.fault) || (!has(i1.fault.abort) || !has(i1.fault.abort.httpStatus))))))"
        );
        assert_eq!(
            unset_expression(&leaf("spec.hosts[]", None)),
            "(!has(object.spec) || !has(object.spec.hosts))"
        );
        assert_eq!(
            unset_expression(&leaf("spec.subsets[].labels", None)),
            "(!has(object.spec) || (!has(object.spec.subsets) || object.spec.subsets.all(i1, !has(i1.labels))))"
        );
        assert_eq!(
            unset_expression(&leaf("spec.telemetry.accessLog.format", Some(json!("text")))),
            "(!has(object.spec) || (!has(object.spec.telemetry) || (!has(object.spec.telemetry.accessLog) || (!has(object.spec.telemetry.accessLog.format) || object.spec.telemetry.accessLog.format == 'text'))))"
        );
    }
}
