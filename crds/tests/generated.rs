//! The committed `config/crd/` must be exactly what the types generate.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/crd");
    for (name, expected) in mycel_crds::render_manifests() {
        let path = dir.join(&name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == expected,
            "{} is out of date with crds/src; run `cargo run -p mycel-crds --bin crdgen`",
            path.display()
        );
    }
}

#[test]
fn every_kind_has_status_and_ready_columns() {
    for crd in mycel_crds::all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let v = &crd.spec.versions[0];
        assert!(
            v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{name}: status subresource"
        );
        let cols: Vec<_> = v.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        for want in ["Ready", "Reason", "Age"] {
            assert!(cols.contains(&want), "{name} lacks printer column {want}: {cols:?}");
        }
    }
}
