//! The bundled Gateway API CRDs (`config/gateway-api/`) are the pinned release's files,
//! unchanged, every one installed by the kustomization, and they still have every field the
//! control plane reads (so that moving to another release cannot drop one silently).

use std::collections::BTreeMap;

use mycel_crds::gateway::GATEWAY_API_VERSION;
use sha2::{Digest, Sha256};

fn dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/gateway-api")
}

#[derive(serde::Deserialize)]
struct Release {
    version: String,
    files: BTreeMap<String, String>,
}

#[test]
fn the_bundled_files_are_the_pinned_releases_and_all_are_installed() {
    let release: Release =
        serde_yaml::from_str(&std::fs::read_to_string(dir().join("RELEASE.yaml")).unwrap()).unwrap();
    assert_eq!(release.version, GATEWAY_API_VERSION, "RELEASE.yaml and GATEWAY_API_VERSION name one release");
    let mut present = Vec::new();
    for entry in std::fs::read_dir(dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name == "RELEASE.yaml" || name == "kustomization.yaml" {
            continue;
        }
        let bytes = std::fs::read(dir().join(&name)).unwrap();
        let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            release.files.get(&name),
            Some(&digest),
            "{name} is not the file of Gateway API {GATEWAY_API_VERSION} that RELEASE.yaml records (edited, or from another release)"
        );
        present.push(name);
    }
    present.sort();
    assert_eq!(present, release.files.keys().cloned().collect::<Vec<_>>(), "every recorded file is here");
    let k: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir().join("kustomization.yaml")).unwrap()).unwrap();
    let installed: Vec<String> =
        k["resources"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let crds: Vec<String> = present.iter().filter(|n| !n.contains("_vap_")).cloned().collect();
    assert_eq!(installed, crds, "the kustomization installs every CRD (and not upstream's admission policy)");
    let default = std::fs::read_to_string(dir().join("../default/kustomization.yaml")).unwrap();
    assert!(
        !default.contains("gateway-api"),
        "the cluster's Gateway API CRDs are not Mycel's to remove with config/default"
    );
    for name in &present {
        let text = std::fs::read_to_string(dir().join(name)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"] != "CustomResourceDefinition" {
                continue;
            }
            let a = &v["metadata"]["annotations"];
            assert_eq!(
                a["gateway.networking.k8s.io/bundle-version"].as_str(),
                Some(GATEWAY_API_VERSION),
                "{name}"
            );
            assert_eq!(a["gateway.networking.k8s.io/channel"].as_str(), Some("standard"), "{name}");
        }
    }
}

/// The schema of `path` (`a.b[].c`) in the served `v1` HTTPRoute.
fn field<'a>(schema: &'a serde_yaml::Value, path: &str) -> Option<&'a serde_yaml::Value> {
    let mut cur = schema;
    for part in path.split('.') {
        let (name, list) = part.strip_suffix("[]").map(|p| (p, true)).unwrap_or((part, false));
        cur = cur.get("properties")?.get(name)?;
        if list {
            cur = cur.get("items")?;
        }
    }
    Some(cur)
}

#[test]
fn every_route_field_the_control_plane_reads_is_in_the_bundled_schema() {
    let text = std::fs::read_to_string(dir().join("gateway.networking.k8s.io_httproutes.yaml")).unwrap();
    let crd: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let v1 = crd["spec"]["versions"].as_sequence().unwrap().iter().find(|v| v["name"] == "v1").unwrap();
    assert_eq!(v1["served"].as_bool(), Some(true));
    let schema = &v1["schema"]["openAPIV3Schema"];
    // What crds/src/gateway.rs names (serde's camelCase names).
    for path in [
        "spec.parentRefs[].group",
        "spec.parentRefs[].kind",
        "spec.parentRefs[].name",
        "spec.parentRefs[].namespace",
        "spec.parentRefs[].port",
        "spec.parentRefs[].sectionName",
        "spec.hostnames",
        "spec.rules[].name",
        "spec.rules[].matches[].path.type",
        "spec.rules[].matches[].path.value",
        "spec.rules[].matches[].headers[].name",
        "spec.rules[].matches[].headers[].type",
        "spec.rules[].matches[].headers[].value",
        "spec.rules[].matches[].queryParams[].name",
        "spec.rules[].matches[].queryParams[].type",
        "spec.rules[].matches[].queryParams[].value",
        "spec.rules[].matches[].method",
        "spec.rules[].filters[].type",
        "spec.rules[].filters[].requestHeaderModifier.set[].name",
        "spec.rules[].filters[].requestHeaderModifier.set[].value",
        "spec.rules[].filters[].requestHeaderModifier.add[].name",
        "spec.rules[].filters[].requestHeaderModifier.remove",
        "spec.rules[].filters[].responseHeaderModifier.set[].name",
        "spec.rules[].filters[].requestRedirect.scheme",
        "spec.rules[].filters[].requestRedirect.hostname",
        "spec.rules[].filters[].requestRedirect.port",
        "spec.rules[].filters[].requestRedirect.statusCode",
        "spec.rules[].filters[].requestRedirect.path.type",
        "spec.rules[].filters[].requestRedirect.path.replaceFullPath",
        "spec.rules[].filters[].requestRedirect.path.replacePrefixMatch",
        "spec.rules[].filters[].urlRewrite.hostname",
        "spec.rules[].filters[].urlRewrite.path.type",
        "spec.rules[].filters[].requestMirror.backendRef.name",
        "spec.rules[].filters[].requestMirror.backendRef.port",
        "spec.rules[].filters[].requestMirror.percent",
        "spec.rules[].filters[].requestMirror.fraction.numerator",
        "spec.rules[].filters[].requestMirror.fraction.denominator",
        "spec.rules[].backendRefs[].group",
        "spec.rules[].backendRefs[].kind",
        "spec.rules[].backendRefs[].name",
        "spec.rules[].backendRefs[].namespace",
        "spec.rules[].backendRefs[].port",
        "spec.rules[].backendRefs[].weight",
        "spec.rules[].backendRefs[].filters",
        "spec.rules[].timeouts.request",
        "spec.rules[].timeouts.backendRequest",
        "status.parents[].parentRef.name",
        "status.parents[].controllerName",
        "status.parents[].conditions",
    ] {
        assert!(field(schema, path).is_some(), "the bundled HTTPRoute has no {path}");
    }
    let text = std::fs::read_to_string(dir().join("gateway.networking.k8s.io_grpcroutes.yaml")).unwrap();
    let crd: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let v1 = crd["spec"]["versions"].as_sequence().unwrap().iter().find(|v| v["name"] == "v1").unwrap();
    let grpc = &v1["schema"]["openAPIV3Schema"];
    for path in [
        "spec.parentRefs[].kind",
        "spec.rules[].name",
        "spec.rules[].matches[].method.type",
        "spec.rules[].matches[].method.service",
        "spec.rules[].matches[].method.method",
        "spec.rules[].matches[].headers[].name",
        "spec.rules[].matches[].headers[].type",
        "spec.rules[].matches[].headers[].value",
        "spec.rules[].filters[].type",
        "spec.rules[].filters[].requestHeaderModifier.set[].name",
        "spec.rules[].filters[].responseHeaderModifier.add[].name",
        "spec.rules[].filters[].requestMirror.backendRef.name",
        "spec.rules[].backendRefs[].name",
        "spec.rules[].backendRefs[].port",
        "spec.rules[].backendRefs[].weight",
        "status.parents[].controllerName",
    ] {
        assert!(field(grpc, path).is_some(), "the bundled GRPCRoute has no {path}");
    }
    // The path match defaults to a PathPrefix of `/`, as the translation assumes.
    let m = field(schema, "spec.rules[].matches").unwrap();
    assert_eq!(m["default"][0]["path"]["type"].as_str(), Some("PathPrefix"));
    assert_eq!(m["default"][0]["path"]["value"].as_str(), Some("/"));
}
