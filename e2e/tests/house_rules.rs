//! House rules that the compiler does not check: library code returns typed errors (`anyhow`
//! only in a binary's `main.rs` or `src/bin/`), so a caller can match on what went wrong.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn libraries_return_typed_errors_and_anyhow_stays_in_binaries() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for lib in ["api/src", "admin/src", "crds/src", "proxy/src", "operator/src", "operator/inject/src"] {
        rust_files(&root.join(lib), &mut files);
    }
    assert!(files.len() > 20, "the sources were found: {files:?}");
    let offenders: Vec<String> = files
        .iter()
        .filter(|p| {
            p.file_name().is_some_and(|n| n != "main.rs") && !p.components().any(|c| c.as_os_str() == "bin")
        })
        .filter(|p| std::fs::read_to_string(p).unwrap().contains("anyhow"))
        .map(|p| p.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert!(offenders.is_empty(), "anyhow in library code (use a typed error): {offenders:?}");
}
