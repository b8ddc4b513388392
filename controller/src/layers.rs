//! The controller's layers, checked: a module imports only from its own layer or the ones below, and the
//! imports inside a layer form no cycle. Read from the sources (`crate::` paths outside test modules);
//! `cargo test -p ferry-controller layers -- --nocapture` prints the graph.

use std::collections::BTreeMap;
use std::path::Path;

/// Lowest first; a reader follows them downwards.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "configuration and CR access",
        &[
            "error",
            "clock",
            "step",
            "validate",
            "config",
            "backoff",
            "cr",
            "caches",
            "admission",
            "wake",
            "memo",
            "metrics",
            "context",
            "objects",
        ],
    ),
    ("exposers", &["expose"]),
    ("mover pod", &["repo", "pod", "placement"]),
    ("flows", &["flow", "phases", "upload", "download"]),
    ("top", &["reconcile", "deletion", "leader", "lib"]),
];

/// Macros exported at the crate root, and the module defining each.
const MACROS: &[(&str, &str)] = &[("proceed", "step")];

/// Test-only modules, outside the layers.
const TEST_ONLY: &[&str] = &["testing", "survival", "layers"];

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|(_, ms)| ms.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer: add it to LAYERS"))
}

/// The modules named after each `crate::` in `code`.
fn imports(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                out.extend(group.split(',').map(ident));
            }
            None => out.push(ident(rest)),
        }
    }
    out.retain(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
    for m in &mut out {
        if let Some((_, module)) = MACROS.iter().find(|(mac, _)| mac == m) {
            *m = module.to_string();
        }
    }
    out
}

/// Module name → the modules it imports, for every source file but the test-only ones.
fn graph() -> BTreeMap<String, Vec<String>> {
    let mut g: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let src = Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .join("src");
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    dirs.push(path);
                }
                continue;
            }
            let rel = path.strip_prefix(&src).expect("under src");
            let module = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .expect("name")
                .trim_end_matches(".rs")
                .to_string();
            if TEST_ONLY.contains(&module.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source");
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            let deps = g.entry(module.clone()).or_default();
            for m in imports(code) {
                if m != module && !TEST_ONLY.contains(&m.as_str()) && !deps.contains(&m) {
                    deps.push(m);
                }
            }
        }
    }
    g
}

fn find_cycle(
    g: &BTreeMap<String, Vec<String>>,
    at: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|m| m == at) {
        return Some(path[i..].to_vec());
    }
    path.push(at.to_string());
    for d in g.get(at).into_iter().flatten() {
        if let Some(c) = find_cycle(g, d, path) {
            return Some(c);
        }
    }
    path.pop();
    None
}

#[test]
fn modules_import_only_downwards_and_without_cycles() {
    let g = graph();
    for (n, (name, modules)) in LAYERS.iter().enumerate() {
        eprintln!("layer {}: {name}", n + 1);
        for m in *modules {
            let mut deps = g.get(*m).cloned().unwrap_or_default();
            deps.sort();
            eprintln!("  {m} -> {}", deps.join(", "));
        }
    }
    for (m, deps) in &g {
        for d in deps {
            assert!(
                layer(d) <= layer(m),
                "{m} (layer {}) imports {d} from the higher layer {}",
                layer(m) + 1,
                layer(d) + 1
            );
        }
        if let Some(c) = find_cycle(&g, m, &mut Vec::new()) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}
