//! The walls of the house (issue 14), checked on every test run:
//! - no cycle among the root crate's top-level modules (`src/*.rs`, `src/*/`), read from the
//!   source: a cycle fails naming it, with a file that makes each of its edges;
//! - `creditmeter-catalog` has no tokio, hyper or rusqlite anywhere in its dependency tree, and
//!   `creditmeter-ledger` no hyper (from `cargo metadata`'s resolve, as `cargo tree -p` shows it).
//!
//! The module graph is built from tokens (proc-macro2's lexer, so comments and strings never
//! add an edge): every path that leaves a file's top-level module counts, `crate::x`,
//! `$crate::x`, `super::super::x` (resolved against the module, inline `mod x { .. }` included),
//! `use crate::{a, b::{..}}` groups over any number of lines, paths inside macros, and `#[cfg(test)]`
//! code. A path to an item of lib.rs itself is an edge to `lib`; paths into the crates lib.rs
//! re-exports (`pub use creditmeter_ledger as ledger;`) are below every module and cannot close
//! a cycle. `/work/wt/tools/modgraph.py` prints the same graph for people.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};

/// One token, flattened: identifiers, `::`, single punctuation, brackets, `"` for any literal.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tok {
    text: String,
    line: usize,
}

fn flatten(ts: TokenStream, out: &mut Vec<Tok>) {
    let mut iter = ts.into_iter().peekable();
    while let Some(tt) = iter.next() {
        let line = tt.span().start().line;
        match tt {
            TokenTree::Ident(i) => {
                let s = i.to_string();
                let s = s.strip_prefix("r#").unwrap_or(&s).to_owned();
                out.push(Tok { text: s, line });
            }
            TokenTree::Punct(p) => {
                if p.as_char() == ':' && p.spacing() == Spacing::Joint {
                    if let Some(TokenTree::Punct(q)) = iter.peek() {
                        if q.as_char() == ':' {
                            iter.next();
                            out.push(Tok {
                                text: "::".into(),
                                line,
                            });
                            continue;
                        }
                    }
                }
                out.push(Tok {
                    text: p.as_char().to_string(),
                    line,
                });
            }
            TokenTree::Literal(_) => out.push(Tok {
                text: "\"".into(),
                line,
            }),
            TokenTree::Group(g) => {
                let (open, close) = match g.delimiter() {
                    Delimiter::Brace => ("{", "}"),
                    Delimiter::Parenthesis => ("(", ")"),
                    Delimiter::Bracket => ("[", "]"),
                    Delimiter::None => ("", ""),
                };
                if !open.is_empty() {
                    out.push(Tok {
                        text: open.into(),
                        line,
                    });
                }
                flatten(g.stream(), out);
                if !close.is_empty() {
                    out.push(Tok {
                        text: close.into(),
                        line: g.span_close().start().line,
                    });
                }
            }
        }
    }
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let ts: TokenStream = src.parse().map_err(|e| format!("{e:?}"))?;
    let mut out = Vec::new();
    flatten(ts, &mut out);
    Ok(out)
}

fn is_ident(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// `toks[i]` is `{`: the first identifier of each top-level item of the use group, and its line.
fn group_heads(toks: &[Tok], mut i: usize) -> Vec<(String, usize)> {
    let (mut heads, mut depth, mut want) = (Vec::new(), 0usize, true);
    while i < toks.len() {
        let t = toks[i].text.as_str();
        match t {
            "{" => {
                depth += 1;
                if depth == 1 {
                    want = true;
                }
            }
            "}" => {
                depth -= 1;
                if depth == 0 {
                    return heads;
                }
            }
            "," if depth == 1 => want = true,
            _ if depth == 1 && want && is_ident(t) => {
                heads.push((t.to_owned(), toks[i].line));
                want = false;
            }
            _ if depth == 1 => want = false,
            _ => {}
        }
        i += 1;
    }
    heads
}

/// Absolute module paths the tokens refer to from module `path` (empty: the crate root), each
/// with the line it is on.
fn refs(toks: &[Tok], path: &[String], tops: &BTreeSet<String>) -> Vec<(Vec<String>, usize)> {
    let is_root = path.is_empty();
    let at = |i: usize| toks.get(i).map_or("", |t| t.text.as_str());
    let mut out = Vec::new();
    // One entry per open brace: whether it opened an inline module.
    let mut braces: Vec<bool> = Vec::new();
    let mut mods: Vec<String> = path.to_vec();
    let mut i = 0;
    while i < toks.len() {
        let t = at(i);
        let prev = if i == 0 { "" } else { at(i - 1) };
        if t == "mod" && is_ident(at(i + 1)) && at(i + 2) == "{" {
            mods.push(at(i + 1).to_owned());
            braces.push(true);
            i += 3;
            continue;
        }
        if t == "{" {
            braces.push(false);
        } else if t == "}" && braces.pop() == Some(true) {
            mods.pop();
        }
        let mut start: Option<(Vec<String>, usize)> = None;
        if t == "crate" && at(i + 1) == "::" && prev != "::" {
            start = Some((Vec::new(), i + 2));
        } else if t == "super" && at(i + 1) == "::" && prev != "::" {
            let (mut base, mut j) = (mods.clone(), i);
            while at(j) == "super" && at(j + 1) == "::" {
                base.pop();
                j += 2;
            }
            start = Some((base, j));
        } else if is_root
            && mods.is_empty()
            && tops.contains(t)
            && at(i + 1) == "::"
            && prev != "::"
            && prev != "mod"
        {
            start = Some((Vec::new(), i));
        }
        if let Some((base, j)) = start {
            let line = toks[i].line;
            if at(j) == "{" {
                for (h, line) in group_heads(toks, j) {
                    let mut full = base.clone();
                    if h != "self" {
                        full.push(h);
                    }
                    out.push((full, line));
                }
            } else if is_ident(at(j)) {
                let mut full = base.clone();
                full.push(at(j).to_owned());
                out.push((full, line));
            } else {
                out.push((base, line));
            }
            i = j.max(i + 1);
            continue;
        }
        i += 1;
    }
    out
}

/// The module path of a file under `src/`: `guard/admission.rs` is `[guard, admission]`.
fn module_path(rel: &str) -> Vec<String> {
    let stem = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut parts: Vec<String> = stem.split('/').map(str::to_owned).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == ["lib"] {
        parts.clear();
    }
    parts
}

/// Who refers to whom, and where each edge is first made (`file:line`).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// The graph of a library crate's top-level modules, from `files` (path under `src/`, text).
/// `main.rs`, `cli/` and `bin/` belong to the binary and are left out.
fn module_graph(files: &[(String, String)]) -> Result<Graph, String> {
    let files: Vec<&(String, String)> = files
        .iter()
        .filter(|(rel, _)| rel != "main.rs" && !rel.starts_with("cli/") && !rel.starts_with("bin/"))
        .collect();
    let tops: BTreeSet<String> = files
        .iter()
        .filter_map(|(rel, _)| module_path(rel).first().cloned())
        .collect();
    // `pub use some_crate as name;` in lib.rs: another crate, below every module.
    let mut externs = BTreeSet::new();
    if let Some((_, lib)) = files.iter().find(|(rel, _)| rel == "lib.rs") {
        let toks = lex(lib).map_err(|e| format!("src/lib.rs: {e}"))?;
        for w in toks.windows(6) {
            let t: Vec<&str> = w.iter().map(|t| t.text.as_str()).collect();
            if t[0] == "pub" && t[1] == "use" && t[3] == "as" && t[5] == ";" {
                externs.insert(t[4].to_owned());
            }
        }
    }
    let mut graph: Graph = BTreeMap::new();
    for t in tops.iter().chain(std::iter::once(&"lib".to_owned())) {
        graph.insert(t.clone(), BTreeMap::new());
    }
    for (rel, src) in files {
        let path = module_path(rel);
        let me = path.first().cloned().unwrap_or_else(|| "lib".into());
        let toks = lex(src).map_err(|e| format!("src/{rel}: {e}"))?;
        for (full, line) in refs(&toks, &path, &tops) {
            let target = match full.first() {
                None => "lib".to_owned(),
                Some(f) if tops.contains(f) => f.clone(),
                Some(f) if externs.contains(f) => continue,
                Some(_) if full.len() == 1 && path.is_empty() => continue,
                Some(_) => "lib".to_owned(), // an item of lib.rs
            };
            if target != me {
                graph
                    .entry(me.clone())
                    .or_default()
                    .entry(target)
                    .or_insert_with(|| format!("src/{rel}:{line}"));
            }
        }
    }
    Ok(graph)
}

/// Every cycle, one per strongly connected component of more than one module, as a path that
/// returns to its start: `a -> b (src/a.rs:3) -> a (src/b.rs:9)`.
fn cycles(graph: &Graph) -> Vec<String> {
    // Tarjan's strongly connected components.
    struct Tarjan<'g> {
        graph: &'g Graph,
        index: HashMap<&'g str, usize>,
        low: HashMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on: BTreeSet<&'g str>,
        comps: Vec<Vec<&'g str>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.graph.get(v).into_iter().flat_map(|e| e.keys()) {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    self.comps.push(comp);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        comps: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    let mut out = Vec::new();
    for comp in t.comps {
        let members: BTreeSet<&str> = comp.iter().copied().collect();
        let start = *members.iter().next().unwrap();
        // Shortest way from `start` back to itself inside the component.
        let mut parent: HashMap<&str, &str> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        let mut back = None;
        while let Some(v) = queue.pop_front() {
            for w in graph[v].keys().map(String::as_str) {
                if !members.contains(w) {
                    continue;
                }
                if w == start {
                    back = Some(v);
                    break;
                }
                if !parent.contains_key(w) {
                    parent.insert(w, v);
                    queue.push_back(w);
                }
            }
            if back.is_some() {
                break;
            }
        }
        let mut path = vec![start];
        let mut v = back.unwrap();
        while v != start {
            path.push(v);
            v = parent[v];
        }
        path[1..].reverse();
        path.push(start);
        let mut s = start.to_owned();
        for w in path.windows(2) {
            s.push_str(&format!(" -> {} ({})", w[1], graph[w[0]][w[1]]));
        }
        out.push(format!(
            "{s}   [all of: {}]",
            members.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    out
}

fn read_src(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_module_cycles_in_the_root_crate() {
    let files = read_src(&src_dir());
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let graph = module_graph(&files).unwrap();
    for m in ["config", "guard", "meter", "proxy", "lib"] {
        assert!(graph.contains_key(m), "module {m} missing from {graph:?}");
    }
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "module cycles in src/ (a module may only use modules below it):\n  {}\n\ngraph: {graph:#?}",
        found.join("\n  ")
    );
}

#[test]
fn the_module_graph_sees_every_form_of_path() {
    let files: Vec<(String, String)> = [
        ("lib.rs", "pub mod a; pub mod b; pub mod c; pub mod d; pub mod e;\npub use some_crate as ext;\npub fn run() {}\n"),
        // A multi-line group with a nested group before the module that matters.
        ("a.rs", "use crate::{\n    ext::Thing,\n    c::{X, Y},\n    b,\n};\n// crate::e::not_an_edge\nconst S: &str = \"crate::e::nor_this\";\n"),
        // super::super from a nested file, and an inline test module.
        ("b/mod.rs", "mod inner;\n"),
        ("b/inner.rs", "fn f() { super::super::c::g(); }\n#[cfg(test)]\nmod tests { fn t() { super::super::super::d::h(); } }\n"),
        // A path in a macro, and an item of lib.rs.
        ("c.rs", "fn g() { tracing::info!(x = ?crate::a::A); crate::run(); }\n"),
        ("d.rs", "fn h() { let _ = 1; }\n"),
        ("e.rs", "/* crate::a::nothing /* nested */ */ fn e() {}\n"),
        ("main.rs", "fn main() { creditmeter::run(); crate::cli::x(); }\n"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let graph = module_graph(&files).unwrap();
    let edges = |m: &str| graph[m].keys().cloned().collect::<Vec<_>>();
    assert_eq!(edges("a"), ["b", "c"]);
    assert_eq!(edges("b"), ["c", "d"]);
    assert_eq!(edges("c"), ["a", "lib"]);
    assert!(edges("d").is_empty());
    assert!(edges("e").is_empty());
    assert!(!graph.contains_key("main") && !graph.contains_key("cli"));
    let found = cycles(&graph);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("a -> c (src/a.rs:3) -> a (src/c.rs:1)"),
        "{}",
        found[0]
    );
}

/// The package id of each name in `cargo metadata`, and the resolve's dependency edges (the
/// package's own dev-dependencies counted for `root` only, as `cargo tree -p` counts them).
/// Returns, for each crate found in `root`'s tree whose name is forbidden, the path to it.
fn forbidden_in_tree(meta: &serde_json::Value, root: &str, forbidden: &[&str]) -> Vec<String> {
    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, &serde_json::Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let root_id = *names
        .iter()
        .find(|(_, n)| **n == root)
        .unwrap_or_else(|| panic!("no package {root} in cargo metadata"))
        .0;
    let mut parent: HashMap<&str, &str> = HashMap::new();
    let mut queue = VecDeque::from([root_id]);
    let mut seen = BTreeSet::from([root_id]);
    let mut found = Vec::new();
    while let Some(id) = queue.pop_front() {
        let name = names[id];
        if forbidden
            .iter()
            .any(|f| name == *f || name.starts_with(&format!("{f}-")))
        {
            let mut chain = vec![name];
            let mut v = id;
            while let Some(p) = parent.get(v) {
                chain.push(names[p]);
                v = p;
            }
            chain.reverse();
            found.push(chain.join(" -> "));
        }
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let kinds = dep["dep_kinds"].as_array().unwrap();
            let counts = id == root_id || kinds.iter().any(|k| k["kind"].as_str() != Some("dev"));
            let pkg = dep["pkg"].as_str().unwrap();
            if counts && seen.insert(pkg) {
                parent.insert(pkg, id);
                queue.push_back(pkg);
            }
        }
    }
    found
}

#[test]
fn catalog_and_ledger_stay_free_of_io_crates() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The walk finds what is there: the binary's tree has all three.
    let root = forbidden_in_tree(&meta, "creditmeter", &["tokio", "hyper", "rusqlite"]);
    for c in [
        "creditmeter -> tokio",
        "creditmeter -> hyper",
        "creditmeter -> rusqlite",
    ] {
        assert!(root.iter().any(|p| p == c), "{c} not seen in {root:?}");
    }
    let sqlite = forbidden_in_tree(&meta, "creditmeter-ledger", &["libsqlite3"]);
    assert_eq!(
        sqlite,
        ["creditmeter-ledger -> rusqlite -> libsqlite3-sys"],
        "a crate reached only through another must be seen"
    );
    let catalog = forbidden_in_tree(
        &meta,
        "creditmeter-catalog",
        &["tokio", "hyper", "rusqlite"],
    );
    assert!(
        catalog.is_empty(),
        "creditmeter-catalog must stay pure (no tokio, hyper or rusqlite):\n  {}",
        catalog.join("\n  ")
    );
    let ledger = forbidden_in_tree(&meta, "creditmeter-ledger", &["hyper"]);
    assert!(
        ledger.is_empty(),
        "creditmeter-ledger must know nothing of HTTP (no hyper):\n  {}",
        ledger.join("\n  ")
    );
}
