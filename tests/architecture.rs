//! The house rules ARCHITECTURE.md claims, checked on the source: no import cycle among the
//! modules of `services`; nothing imports a handler but the router; use cases and the backbone
//! know nothing of the server or the tools built on them; no source file of any crate holds
//! more than ~500 lines of code outside its tests.
//!
//! "Imports" are the paths a module names: `crate::a::b`, `super::x`, `use crate::a::{b, c}`,
//! and `child::x` for a child it declares. A module is a file (`mod.rs` is its folder's
//! module). Test modules (`#[cfg(test)] mod …`, `tests.rs`) are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines of code (not blank, not a comment) a source file may hold outside its tests.
const MAX_LINES_OF_CODE: usize = 500;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the services crate sits in the repository")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source folder") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without `#[cfg(test)] mod … { … }` blocks and without comment lines.
fn code(source: &str) -> String {
    let mut text = source.to_string();
    while let Some(start) = text.find("#[cfg(test)]") {
        let rest = &text[start..];
        let header_end = rest.find(['{', ';']).map(|i| start + i);
        let Some(open) = header_end.filter(|i| text[*i..].starts_with('{')) else {
            // `#[cfg(test)] mod tests;`: the file is left out on its own.
            let end = header_end.map(|i| i + 1).unwrap_or(text.len());
            text.replace_range(start..end, "");
            continue;
        };
        let mut depth = 0usize;
        let mut close = text.len();
        for (i, c) in text[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        text.replace_range(start..close, "");
    }
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn lines_of_code(code: &str) -> usize {
    code.lines().filter(|l| !l.trim().is_empty()).count()
}

/// `services/src/a/b.rs` → `a::b`; `a/mod.rs` → `a`; `lib.rs` → ``.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Every path `root::a::b…` written in `code` (`root` is `crate` or `super`), with use-groups
/// (`root::a::{b, c::d}`) expanded one level.
fn paths_after(code: &str, root: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let needle = format!("{root}::");
    let mut at = 0;
    while let Some(i) = code[at..].find(&needle) {
        let start = at + i;
        at = start + needle.len();
        if code[..start].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let mut segments = Vec::new();
        let mut rest = &code[at..];
        loop {
            let ident: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            if ident.is_empty() {
                break;
            }
            rest = &rest[ident.len()..];
            segments.push(ident);
            match rest.strip_prefix("::") {
                Some(r) => rest = r,
                None => break,
            }
        }
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let item: Vec<String> = item
                    .trim()
                    .split("::")
                    .map(|s| s.chars().take_while(|c| is_ident(*c)).collect())
                    .filter(|s: &String| !s.is_empty() && s != "self")
                    .collect();
                if !item.is_empty() {
                    found.push(segments.iter().cloned().chain(item).collect());
                }
            }
        }
        found.push(segments);
    }
    found
}

struct Graph {
    /// Module → the modules it imports.
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn services_graph() -> Graph {
    let src = repo().join("services/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeMap<String, String> = files
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "tests.rs"))
        .map(|f| {
            let source = std::fs::read_to_string(f).expect("a source file");
            (module_of(&src, f), code(&source))
        })
        .collect();
    let resolve = |path: &[String]| -> Option<String> {
        (1..=path.len())
            .rev()
            .map(|n| path[..n].join("::"))
            .find(|m| modules.contains_key(m))
    };
    let mut edges = BTreeMap::new();
    for (module, code) in &modules {
        let mut deps = BTreeSet::new();
        let here: Vec<String> = if module.is_empty() {
            vec![]
        } else {
            module.split("::").map(str::to_string).collect()
        };
        let mut paths = paths_after(code, "crate");
        for p in paths_after(code, "super") {
            let parent = &here[..here.len().saturating_sub(1)];
            paths.push(parent.iter().cloned().chain(p).collect());
        }
        // A child it declares, named by its path (`child::item`, `use child::…`).
        for line in code.lines() {
            let decl = line
                .trim()
                .trim_start_matches("pub ")
                .trim_start_matches("pub(crate) ");
            let Some(child) = decl.strip_prefix("mod ").and_then(|c| c.strip_suffix(';')) else {
                continue;
            };
            let named = code.lines().any(|l| {
                let l = l.trim();
                !l.ends_with(&format!("mod {child};"))
                    && (l.contains(&format!(" {child}::"))
                        || l.contains(&format!("({child}::"))
                        || l.starts_with(&format!("{child}::"))
                        || l.starts_with(&format!("use {child}::"))
                        || l.starts_with(&format!("pub use {child}::")))
            });
            if named {
                paths.push(here.iter().cloned().chain([child.to_string()]).collect());
            }
        }
        for p in paths {
            if let Some(target) = resolve(&p) {
                if &target != module {
                    deps.insert(target);
                }
            }
        }
        edges.insert(module.clone(), deps);
    }
    Graph { edges }
}

/// Modules that import each other, directly or around a circle (Tarjan's components).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.g.edges.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in g.edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[test]
fn no_two_modules_of_services_import_each_other() {
    let g = services_graph();
    assert!(
        g.edges.len() > 50,
        "the services crate was read: {} modules",
        g.edges.len()
    );
    // The checker sees imports: the router imports the handlers.
    assert!(g.edges["serve::api"].contains("serve::api::calls"));
    let found = cycles(&g);
    assert!(found.is_empty(), "modules importing each other: {found:#?}");
}

#[test]
fn nothing_imports_a_handler_but_the_router() {
    let g = services_graph();
    let offenders: Vec<_> = g
        .edges
        .iter()
        .flat_map(|(m, deps)| deps.iter().map(move |d| (m, d)))
        .filter(|(m, d)| {
            d.starts_with("serve::api::") && !(*m == "serve::api" || *m == "serve::http")
        })
        .filter(|(m, d)| !(m.starts_with("serve::api::") && d.as_str() == "serve::api::errors"))
        .collect();
    assert!(offenders.is_empty(), "{offenders:#?}");
}

#[test]
fn use_cases_and_the_backbone_know_nothing_of_what_is_built_on_them() {
    let g = services_graph();
    let lower = ["usecases", "backbone"];
    let upper = ["serve", "ops", "cli", "app"];
    let offenders: Vec<_> = g
        .edges
        .iter()
        .filter(|(m, _)| {
            lower
                .iter()
                .any(|l| m.as_str() == *l || m.starts_with(&format!("{l}::")))
        })
        .flat_map(|(m, deps)| deps.iter().map(move |d| (m, d)))
        .filter(|(_, d)| {
            upper
                .iter()
                .any(|u| d.as_str() == *u || d.starts_with(&format!("{u}::")))
        })
        .collect();
    assert!(offenders.is_empty(), "{offenders:#?}");
}

#[test]
fn no_source_file_holds_more_than_500_lines_of_code_outside_tests() {
    let mut files = Vec::new();
    for krate in [
        "domain",
        "projections",
        "nats",
        "providers",
        "sims",
        "services",
    ] {
        rust_files(&repo().join(krate).join("src"), &mut files);
    }
    assert!(
        files.len() > 100,
        "the crates were read: {} files",
        files.len()
    );
    let mut too_big: Vec<(usize, String)> = files
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "tests.rs"))
        .map(|f| {
            let source = std::fs::read_to_string(f).expect("a source file");
            let rel = f.strip_prefix(repo()).unwrap_or(f).display().to_string();
            (lines_of_code(&code(&source)), rel)
        })
        .filter(|(n, _)| *n > MAX_LINES_OF_CODE)
        .collect();
    too_big.sort();
    assert!(
        too_big.is_empty(),
        "over {MAX_LINES_OF_CODE} lines of code: {too_big:?}"
    );
}

#[test]
fn the_checkers_see_what_they_claim_to() {
    let source = "use crate::a::{b, c::d};\nfn f() { super::x::y(); }\n// crate::ignored\n\
                  #[cfg(test)]\nmod tests { use crate::z; }\n";
    let code = code(source);
    assert!(!code.contains("crate::z") && !code.contains("ignored"));
    assert_eq!(
        paths_after(&code, "crate"),
        vec![
            vec!["a".to_string(), "b".to_string()],
            vec!["a".to_string(), "c".to_string(), "d".to_string()],
            vec!["a".to_string()],
        ]
    );
    assert_eq!(
        paths_after(&code, "super"),
        vec![vec!["x".to_string(), "y".to_string()]]
    );
    assert_eq!(lines_of_code(&code), 2);
    let cyclic = Graph {
        edges: BTreeMap::from([
            ("a".to_string(), BTreeSet::from(["b".to_string()])),
            ("b".to_string(), BTreeSet::from(["c".to_string()])),
            ("c".to_string(), BTreeSet::from(["a".to_string()])),
            ("d".to_string(), BTreeSet::from(["a".to_string()])),
        ]),
    };
    assert_eq!(cycles(&cyclic), vec![vec!["a", "b", "c"]]);
}

/// `anyhow` at the binary's top only (`main.rs`, the command line's dispatch `cli/mod.rs` and
/// its thin subcommands `cli/analyst.rs`, `cli/dlq.rs`): below it every failure is a typed
/// error that says what failed and keeps its cause (`#[source]`), so a caller can tell a retry
/// from a skip and the top prints the whole chain. `cli/replay.rs` has its own (`replay::Error`).
const BINARYS_TOP: [&str; 4] = ["main.rs", "cli/mod.rs", "cli/analyst.rs", "cli/dlq.rs"];

#[test]
fn anyhow_is_used_only_at_the_binarys_top() {
    let src = repo().join("services/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut offenders: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(&src)
                .expect("under src")
                .display()
                .to_string()
        })
        .filter(|rel| !BINARYS_TOP.contains(&rel.as_str()))
        .filter(|rel| {
            let source = std::fs::read_to_string(src.join(rel)).expect("a source file");
            code(&source).contains("anyhow")
        })
        .collect();
    offenders.sort();
    assert!(
        offenders.is_empty(),
        "anyhow below the binary's top (a typed error with #[source] instead): {offenders:?}"
    );
    // The top is real: a file named there that no longer exists leaves the list.
    for top in BINARYS_TOP {
        assert!(
            src.join(top).exists(),
            "{top} is gone: remove it from BINARYS_TOP"
        );
    }
}
