//! The crate's modules depend on each other one way (issue 16, "import circles").
//!
//! The graph is read from the source, file by file, the way the issue measured it: a module
//! depends on another when its non-test code names it (`use crate::…`, `super::…`, a child
//! module's path, or an inline `crate::…` path). Comment lines and `#[cfg(test)] mod tests` are
//! not code a module runs on, so they do not count.
//!
//! Every circle found fails the test, except the ones in [`ALLOWED`], each listed by the edge
//! that closes it and why it stays for now. An allowed edge that no longer exists fails too, so
//! the list only ever shrinks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Circles that stay for now, each as the edge that closes it: (from, to, why).
const ALLOWED: &[(&str, &str, &str)] = &[
    (
        "metrics",
        "ops",
        "metrics masks numbers in a request path with ops::mask_numbers_in, and ops (the tools) \
         imports most of the daemon; that function belongs in privacy",
    ),
    (
        "consent::index",
        "consent::store",
        "the in-memory cache decodes the store's EncodedEntry: one unit in two files",
    ),
    (
        "store::compaction",
        "store::ledger",
        "compaction is the ledger's private helper module",
    ),
    (
        "pipeline::limits::pacing",
        "pipeline::limits",
        "a limiter uses its parent's MonoClock",
    ),
    (
        "pipeline::limits::throughput",
        "pipeline::limits",
        "a limiter uses its parent's MonoClock",
    ),
];

/// What config may import: leaves that import nothing back (no store, no pipeline stage, no
/// consent store). Config validation checks keywords, time zones and prices against them.
const CONFIG_LEAVES: &[&str] = &[
    "config::limits",
    "job",
    "pricing",
    "privacy",
    "consent::keywords",
    "pipeline::limits::quiet",
];

type Graph = BTreeMap<String, BTreeSet<String>>;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module path (`pipeline::limits::caps`) → file, for every module of the library.
fn modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            modules(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(src_dir()).unwrap().with_extension("");
        let mut segs: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        // main.rs is the binary, a crate of its own; lib.rs is the root that declares modules.
        if segs == ["main"] || segs == ["lib"] {
            continue;
        }
        if segs.last().is_some_and(|s| s == "mod") {
            segs.pop();
        }
        out.insert(segs.join("::"), path);
    }
}

/// The code a module runs on: without its test module and without comment lines.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `a::{b, c::{d, e as f}, self}` → `a::b`, `a::c::d`, `a::c::e`, `a`.
fn expand_use(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let item = tree.split(" as ").next().unwrap_or("").trim();
        let item = item.trim_end_matches("::*").trim_end_matches("::self");
        let full = format!("{prefix}{item}");
        let full = full.trim_end_matches("::").trim_end_matches("::self");
        if !full.is_empty() && item != "self" {
            out.push(full.to_string());
        } else {
            out.push(prefix.trim_end_matches("::").to_string());
        }
        return;
    };
    let head = format!("{prefix}{}", &tree[..open]);
    let close = tree.rfind('}').filter(|&c| c > open).unwrap_or(tree.len());
    let body = &tree[open + 1..close];
    let (mut depth, mut start) = (0, 0);
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand_use(&head, &body[start..i], out);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !body[start..].trim().is_empty() {
        expand_use(&head, &body[start..], out);
    }
}

/// Every module path a piece of code names: use trees and inline paths that start with
/// `crate`, `super`, `self` or one of the module's own children.
fn named_paths(code: &str, children: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let at_word_start =
        |i: usize| i == 0 || !(is_ident(bytes[i - 1] as char) || bytes[i - 1] == b':');
    // Use declarations (`use …;`, `pub use …;`, `pub(crate) use …;`, inside functions too).
    let mut from = 0;
    while let Some(pos) = code[from..].find("use ") {
        let i = from + pos;
        from = i + 4;
        if !at_word_start(i) {
            continue;
        }
        if let Some(end) = code[i..].find(';') {
            expand_use("", &code[i + 4..i + end], &mut out);
        }
    }
    // Inline paths.
    let starts: Vec<String> = ["crate", "super", "self"]
        .iter()
        .map(|s| s.to_string())
        .chain(children.iter().cloned())
        .collect();
    for start in &starts {
        let needle = format!("{start}::");
        let mut from = 0;
        while let Some(pos) = code[from..].find(&needle) {
            let i = from + pos;
            from = i + needle.len();
            if !at_word_start(i) {
                continue;
            }
            let len = code[i..]
                .find(|c: char| !(is_ident(c) || c == ':'))
                .unwrap_or(code.len() - i);
            out.push(code[i..i + len].trim_end_matches(':').to_string());
        }
    }
    out
}

/// The longest module that `path` (absolute segments) names.
fn resolve(mods: &BTreeMap<String, PathBuf>, segs: &[String]) -> Option<String> {
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|m| mods.contains_key(m))
}

fn graph() -> Graph {
    let mut mods = BTreeMap::new();
    modules(&src_dir(), &mut mods);
    let mut g = Graph::new();
    for (module, file) in &mods {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let here: Vec<String> = module.split("::").map(String::from).collect();
        let children: BTreeSet<String> = code
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                let l = l.strip_prefix("pub ").unwrap_or(l);
                let l = l.strip_prefix("pub(crate) ").unwrap_or(l);
                let name = l.strip_prefix("mod ")?.strip_suffix(';')?;
                Some(name.trim().to_string())
            })
            .collect();
        let mut deps = BTreeSet::new();
        for path in named_paths(&code, &children) {
            let mut segs: Vec<String> = path.split("::").map(String::from).collect();
            let mut abs: Vec<String> = match segs.first().map(String::as_str) {
                Some("crate") => {
                    segs.remove(0);
                    Vec::new()
                }
                Some("super") | Some("self") => here.clone(),
                Some(first) if children.contains(first) => here.clone(),
                _ => continue,
            };
            for s in segs {
                match s.as_str() {
                    "super" => {
                        abs.pop();
                    }
                    "self" => {}
                    _ => abs.push(s),
                }
            }
            if let Some(m) = resolve(&mods, &abs)
                && m != *module
            {
                deps.insert(m);
            }
        }
        g.insert(module.clone(), deps);
    }
    g
}

/// Strongly connected components with more than one module: the circles (Tarjan).
fn circles(g: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a Graph,
        next: usize,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let g = s.g;
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        g,
        next: 0,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// Every module `from` reaches.
fn reach(g: &Graph, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(m) = todo.pop() {
        for d in g.get(&m).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn modules_depend_on_each_other_one_way() {
    let mut g = graph();
    assert!(g.len() > 50, "the source was not found or not read: {g:?}");
    for (from, to, why) in ALLOWED {
        let removed = g.get_mut(*from).is_some_and(|d| d.remove(*to));
        assert!(
            removed,
            "allowed edge {from} → {to} no longer exists: remove it from ALLOWED ({why})"
        );
    }
    let found = circles(&g);
    let mut shown = Vec::new();
    for circle in &found {
        let mut edges = Vec::new();
        for a in circle {
            for b in g[a].iter().filter(|b| circle.contains(*b)) {
                edges.push(format!("{a} → {b}"));
            }
        }
        shown.push(edges.join(", "));
    }
    assert!(
        found.is_empty(),
        "import circles (make the dependency run one way, or list the edge in ALLOWED with \
         the reason):\n{}",
        shown.join("\n")
    );
}

#[test]
fn config_imports_nothing_from_the_data_path() {
    let g = graph();
    let outside: Vec<String> = reach(&g, "config")
        .into_iter()
        .filter(|m| !CONFIG_LEAVES.contains(&m.as_str()))
        .collect();
    assert!(
        outside.is_empty(),
        "config reaches {outside:?}: a section's config type belongs in config (beside its \
         validation), and the data path imports it from there"
    );
}

#[test]
fn phone_numbers_are_parsed_in_a_leaf_and_consent_meets_webhooks_one_way() {
    let g = graph();
    let phone = reach(&g, "phone");
    assert!(
        phone
            .iter()
            .all(|m| ["job", "pricing", "privacy"].contains(&m.as_str())),
        "phone reaches {phone:?}"
    );
    for (module, deps) in &g {
        if module.starts_with("consent") {
            for d in deps {
                assert!(
                    !d.starts_with("pipeline") && !d.starts_with("webhook"),
                    "{module} imports {d}: consent is below the pipeline and the webhook applier"
                );
            }
        }
    }
}
