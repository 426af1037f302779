//! The configuration files shipped in the repository are valid Stowage configurations:
//! the embedded default, the container image's, and every `config.toml` embedded in a
//! Kubernetes manifest under `examples/`. A typo there would only show up on a user's
//! cluster; here it fails the build.

use std::path::Path;

use stowage::settings::Config;

fn repo(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The block scalar under every `config.toml: |` key in a YAML file, dedented.
fn embedded_configs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_end().ends_with("config.toml: |") {
            let key_indent = line.len() - line.trim_start().len();
            let mut block = Vec::new();
            for l in &lines[i + 1..] {
                let indent = l.len() - l.trim_start().len();
                if !l.trim().is_empty() && indent <= key_indent {
                    break;
                }
                block.push(*l);
            }
            let strip = block
                .iter()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.len() - l.trim_start().len())
                .min()
                .unwrap_or(0);
            out.push(
                block
                    .iter()
                    .map(|l| if l.len() >= strip { &l[strip..] } else { "" })
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
    }
    out
}

#[test]
fn default_config_file_is_valid() {
    Config::from_toml_str(&repo("config.toml")).expect("config.toml");
}

#[test]
fn container_image_config_is_valid() {
    let c = Config::from_toml_str(&repo("docker/config.toml")).expect("docker/config.toml");
    assert!(
        c.mirror_listen().expect("mirror listen").is_some(),
        "the image serves the mirror endpoint"
    );
}

#[test]
fn kubernetes_example_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/kubernetes") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let yaml = std::fs::read_to_string(&path).expect("read");
        for toml in embedded_configs(&yaml) {
            Config::from_toml_str(&toml)
                .unwrap_or_else(|e| panic!("{}: {e}\n{toml}", path.display()));
            checked += 1;
        }
    }
    assert!(
        checked >= 1,
        "no embedded config.toml found under examples/kubernetes"
    );
}

#[test]
fn embedded_config_extraction_finds_the_block() {
    let yaml = "data:\n  config.toml: |\n    [proxy]\n    listen = \"0.0.0.0:3128\"\n\n    [cache]\n    dir = \"/c\"\nother: 1\n";
    let found = embedded_configs(yaml);
    assert_eq!(found.len(), 1);
    assert!(found[0].starts_with("[proxy]\nlisten"), "{:?}", found[0]);
    assert!(found[0].contains("[cache]\ndir = \"/c\""), "{:?}", found[0]);
    assert!(!found[0].contains("other"), "{:?}", found[0]);
}
