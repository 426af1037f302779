//! Layering (issue 13): the crate's top-level modules form layers with one-way
//! dependencies. A module may name (`crate::X`, in `use` or inline) only itself and
//! modules of strictly lower rank, so no module imports one above it and there is no
//! cycle; the two base modules (rank 0) may not name each other either. `lib.rs` may
//! only declare modules and re-export them; `main.rs` (the binary) is not checked.
//! The layer table is documented in docs/architecture.md; keep it and `RANKS` equal.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Top-level modules, highest layer first.
const RANKS: &[(&str, u32)] = &[
    ("server", 10),
    ("ingress", 9),
    ("admin", 8),
    ("registry_api", 7),
    ("access", 6),
    ("cache", 5),
    ("upstream", 4),
    ("settings", 3),
    ("telemetry", 2),
    ("http_util", 1),
    ("oci", 0),
    ("clock", 0),
];

fn rank(module: &str) -> Option<u32> {
    RANKS.iter().find(|(m, _)| *m == module).map(|&(_, r)| r)
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Blanks out comments (line, nested block, doc), string, raw string and char
/// literals, keeping newlines so line numbers still match the file.
fn strip(src: &str) -> Vec<char> {
    let s: Vec<char> = src.chars().collect();
    let at = |i: usize| s.get(i).copied().unwrap_or('\0');
    let mut out = s.clone();
    let mut i = 0;
    while i < s.len() {
        let start = i;
        // `r` starts a raw string unless it ends an identifier (`br"` is a raw byte string).
        let in_ident =
            i > 0 && is_ident(s[i - 1]) && !(s[i - 1] == 'b' && (i < 2 || !is_ident(s[i - 2])));
        let hashes = (i + 1..).take_while(|&k| at(k) == '#').count();
        if at(i) == '/' && at(i + 1) == '/' {
            i = (i..s.len()).find(|&k| s[k] == '\n').unwrap_or(s.len());
        } else if at(i) == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < s.len() {
                match (at(i), at(i + 1)) {
                    ('/', '*') => (depth, i) = (depth + 1, i + 2),
                    ('*', '/') => (depth, i) = (depth - 1, i + 2),
                    _ => i += 1,
                }
                if depth == 0 {
                    break;
                }
            }
        } else if at(i) == '"' {
            i += 1;
            while i < s.len() && s[i] != '"' {
                i += if s[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if at(i) == 'r' && !in_ident && at(i + 1 + hashes) == '"' {
            i += hashes + 2;
            while i < s.len() && !(s[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#')) {
                i += 1;
            }
            i += hashes + 1;
        } else if at(i) == '\'' && (at(i + 1) == '\\' || at(i + 2) == '\'') {
            // A char literal ('x', '"', '\'', '\u{..}'); a lifetime ('a) is left alone.
            i += if at(i + 1) == '\\' { 3 } else { 2 };
            while i < s.len() && s[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else {
            i += 1;
            continue;
        }
        for c in &mut out[start..i.min(s.len())] {
            if *c != '\n' {
                *c = ' ';
            }
        }
    }
    out
}

/// Identifiers and single punctuation characters, each with its line.
fn tokens(s: &[char]) -> Vec<(String, usize)> {
    let (mut out, mut line, mut i) = (Vec::new(), 1, 0);
    while i < s.len() {
        let len = s[i..].iter().take_while(|&&c| is_ident(c)).count().max(1);
        if s[i] == '\n' {
            line += 1;
        } else if !s[i].is_whitespace() {
            out.push((s[i..i + len].iter().collect(), line));
        }
        i += len;
    }
    out
}

/// The module each `crate::` path starts with, with its line: `X` in `crate::X...`, and
/// each top-level item of a group `crate::{X::.., Y::{..}, ..}`, which may span lines.
fn named(stripped: &[char]) -> Vec<(String, usize)> {
    let t = tokens(stripped);
    let tok = |i: usize| t.get(i).map_or("", |(s, _)| s.as_str());
    let mut found = Vec::new();
    for i in 0..t.len() {
        if tok(i) != "crate" || tok(i + 1) != ":" || tok(i + 2) != ":" {
            continue; // also skips pub(crate) and extern crate
        }
        let (mut depth, mut expect) = (0, true);
        for (name, line) in &t[i + 3..] {
            match name.as_str() {
                "{" => (depth, expect) = (depth + 1, depth == 0),
                "}" if depth == 1 => break,
                "}" => depth -= 1,
                "," => expect = depth == 1,
                _ => {
                    if expect && name.starts_with(is_ident) {
                        found.push((name.clone(), *line));
                    }
                    if depth == 0 {
                        break; // crate::X without braces
                    }
                    expect = false;
                }
            }
        }
    }
    found
}

/// Checks `lib.rs` holds only attributes, `mod` declarations and `pub use` re-exports;
/// returns the violations and which module each re-exported name comes from.
fn check_lib(stripped: &[char]) -> (Vec<String>, HashMap<String, String>) {
    let text: String = stripped.iter().collect();
    let (mut bad, mut reexports, mut offset) = (Vec::new(), HashMap::new(), 0);
    for stmt in text.split_inclusive(';') {
        offset += stmt.len();
        let mut item = stmt.strip_suffix(';').unwrap_or(stmt).trim_start();
        while let Some(attr) = item.strip_prefix('#') {
            let mut depth = 0;
            let end = attr.char_indices().find(|&(_, c)| {
                depth += (c == '[') as i32 - (c == ']') as i32;
                c == ']' && depth == 0
            });
            item = attr[end.map_or(attr.len(), |(k, _)| k + 1)..].trim_start();
        }
        let words: Vec<&str> = item.split_whitespace().collect();
        match words[..] {
            [] => {}
            ["mod", m] | ["pub", "mod", m] | ["pub(crate)", "mod", m]
                if m.chars().all(is_ident) => {}
            ["pub", "use", ..] => {
                let keywords = ["pub", "use", "crate", "self", "super", "as"];
                let idents: Vec<&str> = item
                    .split(|c: char| !is_ident(c))
                    .filter(|w| !w.is_empty() && !keywords.contains(w))
                    .collect();
                for name in idents.iter().skip(1) {
                    reexports.insert(name.to_string(), idents[0].to_string());
                }
            }
            _ => {
                let at = offset - stmt.strip_suffix(';').map_or(0, |_| 1) - item.len();
                let shown: String = words.join(" ").chars().take(60).collect();
                let line = text[..at].matches('\n').count() + 1;
                bad.push(format!(
                    "src/lib.rs:{line}: lib.rs may only declare modules and re-export them; \
                     found `{shown}`"
                ));
            }
        }
    }
    (bad, reexports)
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in fs::read_dir(path).expect("read module folder") {
            rust_files(&entry.expect("read module folder").path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

/// All layering violations in the crate rooted at `src_dir`, one line each.
fn violations(src_dir: &Path) -> Vec<String> {
    let read =
        |p: &Path| fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let (mut out, reexports) = match src_dir.join("lib.rs") {
        lib if lib.exists() => check_lib(&strip(&read(&lib))),
        _ => (Vec::new(), HashMap::new()),
    };
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in fs::read_dir(src_dir).unwrap_or_else(|e| panic!("read {}: {e}", src_dir.display()))
    {
        let path = entry.expect("read src").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let module = match name.strip_suffix(".rs") {
            _ if name == "lib.rs" || name == "main.rs" || name == "bin" => continue,
            Some(m) => m.to_string(),
            None if path.is_dir() => name,
            None => continue,
        };
        rust_files(&path, modules.entry(module).or_default());
    }
    modules.values_mut().for_each(|files| files.sort());
    for (module, files) in &modules {
        let Some(own) = rank(module) else {
            out.push(format!(
                "src/{module}: module `{module}` has no rank; add it to RANKS in \
                 tests/layering.rs and to the layer table in docs/architecture.md"
            ));
            continue;
        };
        for file in files {
            let shown = file
                .strip_prefix(src_dir)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            for (name, line) in named(&strip(&read(file))) {
                let target = match reexports.get(&name) {
                    _ if modules.contains_key(&name) => &name,
                    Some(m) if modules.contains_key(m) => m,
                    _ => continue, // a macro or something that is not a module
                };
                match rank(target) {
                    Some(r) if target != module && r >= own => out.push(format!(
                        "src/{shown}:{line}: {module} (rank {own}) names {target} (rank {r})"
                    )),
                    _ => {}
                }
            }
        }
    }
    out
}

#[test]
fn lower_layers_never_name_higher_ones() {
    // Always set under cargo; absent only when this file is compiled alone with rustc.
    let Some(root) = option_env!("CARGO_MANIFEST_DIR") else {
        eprintln!("CARGO_MANIFEST_DIR unset (not built by cargo): skipping the real tree");
        return;
    };
    let found = violations(&Path::new(root).join("src"));
    assert!(
        found.is_empty(),
        "layering violations (see docs/architecture.md):\n{}\n",
        found.join("\n")
    );
}

/// A synthetic crate under the temp dir, removed on drop (also when a test fails).
struct Tree(PathBuf);

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds a `src/` from `=== path` header lines, each followed by that file's text,
/// and returns its violations.
fn check(spec: &str) -> Vec<String> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = format!("stowage-layering-{}-{n}", std::process::id());
    let tree = Tree(std::env::temp_dir().join(dir));
    let src = tree.0.join("src");
    for file in spec.split("\n=== ").skip(1) {
        let (path, text) = file.split_once('\n').unwrap_or((file, ""));
        let path = src.join(path.trim());
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    violations(&src)
}

#[test]
fn finds_use_of_a_higher_module() {
    let found = check(
        "
=== server.rs
=== cache/mod.rs
mod fill;
=== cache/fill.rs
//! Fills.
use crate::server::State;
",
    );
    assert_eq!(
        found,
        ["src/cache/fill.rs:2: cache (rank 5) names server (rank 10)"]
    );
}

#[test]
fn finds_names_in_grouped_multi_line_use() {
    let found = check(
        "
=== oci.rs
=== ingress.rs
=== http_util.rs
=== registry_api.rs
=== cache.rs
use crate::{
    oci::Digest,
    ingress::{self, Y},
    http_util::{a::{B, C}, registry_api},
};
",
    );
    assert_eq!(
        found,
        ["src/cache.rs:3: cache (rank 5) names ingress (rank 9)"]
    );
}

#[test]
fn finds_inline_paths_and_names_reexported_from_lib_rs() {
    let found = check(
        "
=== lib.rs
pub mod server;
pub use server::{Error, Server as S};
=== admin.rs
=== server.rs
=== telemetry.rs
fn f() {
    let _ = crate :: admin::f();
    let _: crate::S = crate::Error;
}
",
    );
    let expected = [
        "src/telemetry.rs:2: telemetry (rank 2) names admin (rank 8)",
        "src/telemetry.rs:3: telemetry (rank 2) names server (rank 10)",
        "src/telemetry.rs:3: telemetry (rank 2) names server (rank 10)",
    ];
    assert_eq!(found, expected);
}

#[test]
fn ignores_comments_and_literals() {
    let found = check(
        r###"
=== server.rs
=== admin.rs
=== cache.rs
//! Module docs: crate::server is above us.
/// Calls crate::server::run.
// use crate::server;
/* block /* nested crate::server */ crate::server */
/** doc block crate::server */
pub(crate) fn f<'a>(x: &'a str) -> &'a str {
    let _ = "crate::server \" crate::server";
    let _ = r"crate::server";
    let _ = (r"C:\", r#"a "crate::server" b"#);
    let _ = br##"a "# crate::server "##;
    let _ = ['"', '\'','"', '\u{22}', 'x'];
    let _ = b"crate::server";
    crate::admin::g(); x
}
"###,
    );
    assert_eq!(
        found,
        ["src/cache.rs:13: cache (rank 5) names admin (rank 8)"]
    );
}

#[test]
fn reports_an_unranked_module() {
    let found = check("\n=== widgets/mod.rs\nmod x;\n=== widgets/x.rs\n=== clock.rs\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("`widgets` has no rank"), "{found:?}");
    assert!(found[0].contains("tests/layering.rs") && found[0].contains("docs/architecture.md"));
}

#[test]
fn clean_tree_has_no_violations() {
    let found = check(
        "
=== lib.rs
//! Docs.
#![forbid(unsafe_code)]
pub mod cache;
#[cfg(unix)]
pub mod server;
pub use server::{Error, Server};
=== main.rs
fn main() { stowage::server::run(); crate::server::run(); }
=== server.rs
use crate::{cache, oci::Digest, clock};
use crate::server::State;
=== cache/mod.rs
pub mod fill;
pub(crate) use crate::oci;
=== cache/fill.rs
use crate::{clock::Now, oci::{Digest, Name}};
fn f() { crate::cache::g(crate::clock::T { server: 1 }); }
=== oci.rs
use crate::oci::x;
=== clock.rs
",
    );
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn base_modules_may_not_name_each_other() {
    let found = check("\n=== oci.rs\nuse crate::clock::Now;\n=== clock.rs\n");
    assert_eq!(found, ["src/oci.rs:1: oci (rank 0) names clock (rank 0)"]);
}

#[test]
fn lib_rs_only_declares_and_reexports() {
    let found =
        check("\n=== lib.rs\npub mod clock;\npub use clock::Now;\n\nfn f() {\n    g();\n}\n");
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].starts_with("src/lib.rs:4: lib.rs may only declare modules"));
}
