//! Keeps the shape of the crate: no import cycle between top-level modules
//! (a module may use the ones below it, never one that uses it back), and no
//! spawned commands (the kernel's network state goes through `net`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading the source tree") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn ident(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The first segments of the paths in `{...}` at the start of `text`
/// (`{a::{b, c}, d}` gives a and d).
fn group_heads(text: &str) -> Vec<&str> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect = true;
    for (i, c) in text.char_indices() {
        match c {
            '{' => {
                depth += 1;
                expect = depth == 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => expect = true,
            c if expect && depth == 1 && (c.is_ascii_alphabetic() || c == '_') => {
                heads.push(ident(&text[i..]));
                expect = false;
            }
            _ => {}
        }
    }
    heads
}

/// Top-level modules that `text` (a file `depth` modules deep) refers to,
/// through `crate::` or enough `super::` to reach the crate root.
fn references(text: &str, depth: usize) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if rest.starts_with('{') {
            out.extend(group_heads(rest).into_iter().map(String::from));
        } else {
            out.insert(ident(rest).to_string());
        }
    }
    let mut at = 0;
    while let Some(found) = text[at..].find("super::") {
        let start = at + found;
        let mut rest = &text[start..];
        let mut ups = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            ups += 1;
            rest = r;
        }
        if ups == depth {
            if rest.starts_with('{') {
                out.extend(group_heads(rest).into_iter().map(String::from));
            } else {
                out.insert(ident(rest).to_string());
            }
        }
        at = start + ups * "super::".len();
    }
    out
}

/// Top-level module → the top-level modules it refers to.
fn graph(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(root, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(root).expect("under the root");
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        let top = parts[0].clone();
        if top == "main" || top == "lib" {
            continue;
        }
        let depth = if parts.last().is_some_and(|p| p == "mod") {
            parts.len() - 1
        } else {
            parts.len()
        };
        let text = std::fs::read_to_string(file).expect("reading a source file");
        let refs = references(&text, depth);
        graph
            .entry(top.clone())
            .or_default()
            .extend(refs.into_iter().filter(|r| *r != top));
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    graph
}

/// The strongly connected components with more than one module.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for d in &graph[&m] {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for m in graph.keys() {
        let component: Vec<String> = graph
            .keys()
            .filter(|o| *o == m || (reaches[m].contains(*o) && reaches[*o].contains(m)))
            .cloned()
            .collect();
        if component.len() > 1 && !out.contains(&component) {
            out.push(component);
        }
    }
    out
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn top_level_modules_import_each_other_in_one_direction() {
    let graph = graph(&root());
    assert!(
        graph.contains_key("lb") && graph.contains_key("net"),
        "{graph:?}"
    );
    let found = cycles(&graph);
    let shown: Vec<String> = graph
        .iter()
        .map(|(m, d)| format!("{m}: {}", d.iter().cloned().collect::<Vec<_>>().join(", ")))
        .collect();
    assert!(
        found.is_empty(),
        "import cycles between top-level modules: {found:?}\n{}",
        shown.join("\n")
    );
}

#[test]
fn the_daemon_spawns_no_commands() {
    let mut files = Vec::new();
    sources(&root(), &mut files);
    let needle = ["Command", "::new"].concat();
    let spawning: Vec<_> = files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .expect("reading a source file")
                .contains(&needle)
        })
        .collect();
    assert!(spawning.is_empty(), "{spawning:?} spawn commands");
}

/// Models validate and keep state; map entries are built in `tables.rs`
/// and written by `dataplane/`. A model never imports its writer.
#[test]
fn models_do_not_import_the_dataplane() {
    let mut files = Vec::new();
    sources(&root(), &mut files);
    let models: Vec<_> = files
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "model.rs"))
        .collect();
    assert!(models.len() >= 3, "{models:?}");
    let importing: Vec<_> = models
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).expect("reading a source file");
            let depth = f
                .strip_prefix(root())
                .expect("under the root")
                .iter()
                .count();
            references(&text, depth).contains("dataplane")
        })
        .collect();
    assert!(importing.is_empty(), "{importing:?} import the dataplane");
}

#[test]
fn the_scanner_sees_groups_and_supers() {
    let text = "use crate::{a::{b, c}, d::e};\nuse super::super::f::g;\nuse super::h;\n\
                let x = crate::i::j();";
    let refs = references(text, 2);
    let want: BTreeSet<String> = ["a", "d", "f", "i"].iter().map(|s| s.to_string()).collect();
    assert_eq!(refs, want);
    let mut g = BTreeMap::new();
    g.insert("x".to_string(), BTreeSet::from(["y".to_string()]));
    g.insert("y".to_string(), BTreeSet::from(["z".to_string()]));
    g.insert("z".to_string(), BTreeSet::from(["x".to_string()]));
    g.insert("w".to_string(), BTreeSet::from(["x".to_string()]));
    assert_eq!(
        cycles(&g),
        vec![vec!["x".to_string(), "y".into(), "z".into()]]
    );
}
