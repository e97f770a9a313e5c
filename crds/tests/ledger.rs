//! The field ledger covers every field: each leaf of each CRD's `spec` is either implemented,
//! with a test that exists, or on the `not_yet` list (and so warned about at admission). So is
//! every `mycel.io/*` annotation the injector reads.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use mycel_crds::ledger::{self, Fields};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The workspace crates: (library name, directory).
const CRATES: &[(&str, &str)] = &[
    ("mycel_crds", "crds"),
    ("mycel_api", "api"),
    ("mycel_admin", "admin"),
    ("mycel_operator", "operator"),
    ("mycel_inject", "operator/inject"),
    ("mycel_proxy", "proxy"),
    ("mycelctl", "cli"),
    ("mycel_e2e", "e2e"),
];

/// Where the test named `name` is defined, if it is: `<target>::<fn>` is an integration test
/// (`<crate>/tests/<target>.rs`), `<crate>::<module>::…::<fn>` a unit test in that crate.
fn find_test(name: &str) -> Result<String, String> {
    let parts: Vec<&str> = name.split("::").collect();
    let (Some(first), Some(func)) = (parts.first(), parts.last()) else { return Err("empty".into()) };
    if parts.len() < 2 {
        return Err(format!("{name:?} is not <target>::<function>"));
    }
    let mut files = Vec::new();
    match CRATES.iter().find(|(lib, _)| lib == first) {
        Some((_, dir)) => {
            // A unit test: the module path names the file (…/src/a/b.rs or …/src/a/b/mod.rs or a
            // `tests` module inside it).
            sources(&root().join(dir).join("src"), &mut files);
            let module: Vec<&str> =
                parts[1..parts.len() - 1].iter().copied().filter(|m| *m != "tests").collect();
            let rel = module.join("/");
            files.retain(|f| {
                let s = f.to_string_lossy();
                if rel.is_empty() {
                    return s.ends_with("src/lib.rs") || s.ends_with("src/main.rs");
                }
                s.ends_with(&format!("src/{rel}.rs"))
                    || s.ends_with(&format!("src/{rel}/mod.rs"))
                    || s.ends_with(&format!("src/{rel}/tests.rs"))
            });
        }
        None => {
            for (_, dir) in CRATES {
                let f = root().join(dir).join("tests").join(format!("{first}.rs"));
                if f.exists() {
                    files.push(f);
                }
            }
        }
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.contains(&format!("fn {func}(")) {
                let attributed = lines[i.saturating_sub(3)..i]
                    .iter()
                    .any(|a| a.contains("#[test]") || a.contains("#[tokio::test"));
                if attributed {
                    return Ok(text);
                }
            }
        }
    }
    Err(format!("no test function {func} found for {name}"))
}

/// The key a test must mention to be said to exercise `path`: its last field name.
fn key(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path).trim_end_matches("[]").trim_end_matches("{}")
}

fn check(kind: &str, fields: &Fields, leaves: &BTreeSet<String>, problems: &mut Vec<String>) {
    for p in &fields.not_yet {
        if fields.implemented.contains_key(p) {
            problems.push(format!("{kind}: {p} is both implemented and not_yet"));
        }
    }
    for p in leaves {
        if !fields.implemented.contains_key(p) && !fields.not_yet.contains(p) {
            problems.push(format!("{kind}: {p} is in neither list of docs/reference/field-ledger.yaml"));
        }
    }
    for p in fields.implemented.keys().chain(&fields.not_yet) {
        if !leaves.contains(p) {
            problems.push(format!("{kind}: {p} is not a field (no such leaf)"));
        }
    }
    for (p, test) in &fields.implemented {
        match find_test(test) {
            Ok(text) if text.contains(key(p)) => {}
            Ok(_) => problems.push(format!("{kind}: {p}: the file of {test} never mentions {:?}", key(p))),
            Err(e) => problems.push(format!("{kind}: {p}: {e}")),
        }
    }
}

#[test]
fn every_field_is_implemented_with_a_test_or_listed_as_not_yet() {
    let ledger = ledger::ledger();
    let mut problems = Vec::new();
    for crd in mycel_crds::all_crds() {
        let kind = crd.spec.names.kind.clone();
        let leaves: BTreeSet<String> = ledger::leaves(&crd).into_iter().map(|l| l.path).collect();
        match ledger.kinds.get(&kind) {
            Some(fields) => check(&kind, fields, &leaves, &mut problems),
            None => problems.push(format!("{kind}: missing from the ledger")),
        }
    }
    // Annotations: every `mycel.io/…` key the injector, the webhook and the policy translation read.
    let mut read = BTreeSet::new();
    for f in [
        "operator/inject/src/lib.rs",
        "operator/src/controlplane/webhook.rs",
        "operator/src/controlplane/translate/authz.rs",
    ] {
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        for (i, _) in text.match_indices("\"mycel.io/") {
            let rest = &text[i + 1..];
            let end = rest.find('"').unwrap_or(0);
            read.insert(rest[..end].to_string());
        }
    }
    // Written by the injector, never read from a user.
    read.remove("mycel.io/status");
    check("annotations", &ledger.annotations, &read, &mut problems);
    assert!(problems.is_empty(), "the field ledger is out of date:\n  {}", problems.join("\n  "));
}

#[test]
fn a_named_test_that_does_not_exist_is_caught() {
    assert!(find_test("mesh::no_such_test").is_err());
    assert!(find_test("mycel_operator::controlplane::inject::tests::no_such_test").is_err());
    assert!(find_test("mesh::injected_pods_talk_through_their_sidecars").is_ok());
}

#[test]
fn the_fields_a_resource_sets_are_found_as_its_status_names_them() {
    use kube::CustomResourceExt;
    let crd = mycel_crds::traffic_route::TrafficRoute::crd();
    let ledger = ledger::ledger();
    let object = serde_json::json!({
        "spec": {
            "hosts": ["web"],
            "http": [
                {"mirror": null},
                {"retries": {"attempts": 2}, "mirror": {"service": "copy", "percent": 5}},
                {"backends": [{"service": "web", "subset": "v2"}]}
            ],
            "tcp": [{"idleTimeout": null, "backends": [{"service": "db"}]}, {"port": 5432, "backends": [{"service": "db"}]}]
        }
    });
    // Everything it sets is implemented: nothing named.
    assert!(ledger::not_yet_set(&ledger, &crd, &object).is_empty());
    let dp = mycel_crds::destination_policy::DestinationPolicy::crd();
    let object = serde_json::json!({
        "spec": {"host": "web", "tls": null, "connectionPool": {"tcp": {"maxConnections": 5, "connectTimeout": "1s"}},
                 "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}
    });
    let set = ledger::not_yet_set(&ledger, &dp, &object);
    // Implemented fields are not named; a null is not set.
    assert_eq!(set, ["spec.connectionPool.tcp.maxConnections"]);
    assert!(ledger::not_yet_set(&ledger, &crd, &serde_json::json!({"spec": {"http": []}})).is_empty());
    // Every field of PeerAuthentication is implemented: nothing to name.
    let pa = mycel_crds::peer_authentication::PeerAuthentication::crd();
    let strict = serde_json::json!({"spec": {"mtls": {"mode": "STRICT"}}});
    assert!(ledger::not_yet_set(&ledger, &pa, &strict).is_empty());
}
