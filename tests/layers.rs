//! The top-level modules of `src/` must not import each other in a cycle.
//!
//! A cycle means no module of it can be understood, tested or changed without the others;
//! `store`, `cluster` and `config` had one until their shared types moved to `history`.
//! This test reads `src/` itself, with the rules of the `layers.py` hook: a module `a`
//! depends on `b` when a file under `a` names `crate::b` outside its test section (from the
//! first `#[cfg(test)]` to the end of the file) and outside `//` comments (doc comments
//! included); `main` and `lib` are left out. The cycles are the graph's strongly connected
//! components of two or more modules (Tarjan's algorithm).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Modules tolerated in a cycle: none. (A ratchet: were one listed here while in no cycle
/// any more, the test would fail until it is removed.)
const KNOWN_CYCLE: &[&str] = &[];

/// Files of `src/` that are not modules of the library's graph.
const IGNORED: &[&str] = &["main", "lib"];

/// Module → the modules it names → where it first names each (`path:line`, `path`
/// relative to `src/`).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

#[test]
fn no_new_cycle_among_the_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    let graph = build_graph(&files);
    // Guard against a test that passes because it read nothing.
    assert!(
        graph.len() >= 10 && graph.contains_key("store") && graph.contains_key("cluster"),
        "read too few modules from {}: {:?}",
        src.display(),
        graph.keys().collect::<Vec<_>>()
    );
    assert!(
        graph["store"].contains_key("history"),
        "store does not seem to name crate::history any more: is the scanner broken?"
    );
    if let Err(report) = check(&graph, KNOWN_CYCLE) {
        panic!("{report}");
    }
}

/// Collects every `.rs` file under `dir` as (path relative to `root` with `/`, text),
/// sorted by path so that the `path:line` reported for an edge does not vary.
fn read_tree(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_tree(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).expect("under root");
            let rel: Vec<_> = rel.iter().map(|c| c.to_string_lossy()).collect();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((rel.join("/"), String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
}

/// The module graph of `files` ((path relative to `src/`, text) pairs).
fn build_graph(files: &[(String, String)]) -> Graph {
    let mut graph = Graph::new();
    for (rel, text) in files {
        let first = rel.split('/').next().unwrap_or(rel);
        let top = first.strip_suffix(".rs").unwrap_or(first);
        if IGNORED.contains(&top) {
            continue;
        }
        let edges = graph.entry(top.to_string()).or_default();
        let text = match text.find("#[cfg(test)]") {
            Some(cut) => &text[..cut],
            None => text,
        };
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for dst in crate_refs(code) {
                if dst != top && !IGNORED.contains(&dst) {
                    edges
                        .entry(dst.to_string())
                        .or_insert_with(|| format!("{rel}:{}", n + 1));
                }
            }
        }
    }
    graph
}

/// The `name`s of the `crate::name` in `code` (Python's `\bcrate::(\w+)`).
fn crate_refs(code: &str) -> Vec<&str> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut names = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if code[..at].chars().next_back().is_some_and(is_word) {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        let end = rest.find(|c: char| !is_word(c)).unwrap_or(rest.len());
        if end > 0 {
            names.push(&rest[..end]);
        }
    }
    names
}

/// The strongly connected components of two or more modules, each sorted, in a stable
/// order. Edges to names that are not modules of the graph are ignored.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph[v].keys() {
                let w = w.as_str();
                if !self.graph.contains_key(w) {
                    continue;
                }
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.found.sort();
    t.found
}

/// `Ok` when every cycle of `graph` lies within `known`, and every module of `known` is
/// still in one; otherwise what is wrong, each bad cycle with its edges (`a->b (file:line)`).
fn check(graph: &Graph, known: &[&str]) -> Result<(), String> {
    let mut problems = Vec::new();
    let mut in_a_cycle = BTreeSet::new();
    for component in cycles(graph) {
        in_a_cycle.extend(component.iter().cloned());
        if component.iter().all(|m| known.contains(&m.as_str())) {
            continue;
        }
        let mut edges = Vec::new();
        for a in &component {
            for (b, at) in &graph[a] {
                if component.contains(b) {
                    edges.push(format!("{a}->{b} ({at})"));
                }
            }
        }
        problems.push(format!(
            "import cycle among {}: {}",
            component.join(" "),
            edges.join("; ")
        ));
    }
    let stale: Vec<_> = known.iter().filter(|m| !in_a_cycle.contains(**m)).collect();
    if !stale.is_empty() {
        problems.push(format!(
            "KNOWN_CYCLE in tests/layers.rs lists {stale:?}, which are in no cycle any more: \
             remove them from it"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// A graph from `(file path, text)` pairs, for the tests of the checker itself.
fn graph_of(files: &[(&str, &str)]) -> Graph {
    let files: Vec<_> = files
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
    build_graph(&files)
}

#[test]
fn the_scanner_follows_the_hook_rules() {
    let g = graph_of(&[
        (
            "a/mod.rs",
            "use crate::b::X;\n// crate::c in a comment\n/// [`crate::c`] in a doc\n\
             let x = mycrate::d; let y = $crate::e;\nuse crate::a::Y; use crate::main;\n\
             #[cfg(test)]\nmod tests { use crate::f; }\n",
        ),
        ("a/deep/x.rs", "fn f() { crate::g::h(); }"),
        ("b.rs", ""),
        ("main.rs", "use crate::a;"),
    ]);
    let a: Vec<_> = g["a"]
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        a,
        [
            ("b", "a/mod.rs:1"),
            ("e", "a/mod.rs:4"),
            ("g", "a/deep/x.rs:1")
        ]
    );
    assert!(g["b"].is_empty());
    assert!(!g.contains_key("main"));
}

#[test]
fn the_cycle_finder_finds_cycles() {
    // a -> b -> c -> a is a cycle; d -> a hangs off it; e <-> f is another; g -> g and an
    // edge to a name that is not a module are no cycles.
    let g = graph_of(&[
        ("a.rs", "use crate::b;"),
        ("b.rs", "use crate::c;"),
        ("c.rs", "use crate::a; use crate::nowhere;"),
        ("d.rs", "use crate::a;"),
        ("e.rs", "use crate::f;"),
        ("f.rs", "\n\nuse crate::e;"),
        ("g.rs", "use crate::g;"),
    ]);
    assert_eq!(cycles(&g), [vec!["a", "b", "c"], vec!["e", "f"]]);
    assert_eq!(
        cycles(&graph_of(&[("a.rs", "use crate::b;"), ("b.rs", "")])).len(),
        0
    );

    let err = check(&g, &["a", "b", "c"]).unwrap_err();
    assert!(
        err.contains("e->f (e.rs:1)") && err.contains("f->e (f.rs:3)"),
        "{err}"
    );
    assert!(!err.contains("a->b"), "a known cycle is tolerated: {err}");
    assert!(check(&g, &["a", "b", "c", "e", "f"]).is_ok());
    // A known cycle that takes in another module fails, naming every edge of it.
    let err = check(&g, &["a", "b"]).unwrap_err();
    assert!(
        err.contains("a->b (a.rs:1)") && err.contains("c->a (c.rs:1)"),
        "{err}"
    );
    // A module listed as known that is in no cycle any more fails too (the ratchet).
    let err = check(&g, &["a", "b", "c", "d", "e", "f"]).unwrap_err();
    assert!(err.contains("[\"d\"]"), "{err}");
    assert!(check(&graph_of(&[("a.rs", "")]), &[]).is_ok());
}
