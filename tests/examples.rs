//! The configuration files shipped in the repository are valid Stowage configurations:
//! the embedded default, the container image's, and every `config.toml` embedded in a
//! Kubernetes manifest under `examples/`. The command lines the image and the Kubernetes
//! examples start the binary with (ENTRYPOINT, CMD, `command`, `args`) are ones the real
//! binary accepts, naming a config file the image or a ConfigMap mount provides. A typo
//! there would only show up on a user's cluster; here it fails the build.

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

/// The exec-form (JSON array) value of the last `KEYWORD` instruction that the Dockerfile's
/// default (final) stage has, as the container runtime sees it: its own, or else the one it
/// inherits from the stage it is built `FROM`, and so on up.
fn dockerfile_exec(dockerfile: &str, keyword: &str) -> Vec<String> {
    // (alias, base, lines) per stage, in order.
    let mut stages: Vec<(Option<&str>, &str, Vec<&str>)> = Vec::new();
    for line in dockerfile.lines() {
        if let Some(from) = line.strip_prefix("FROM ") {
            let words: Vec<&str> = from.split_whitespace().collect();
            let alias = match words.as_slice() {
                [_, as_, alias] if as_.eq_ignore_ascii_case("as") => Some(*alias),
                _ => None,
            };
            stages.push((alias, words[0], Vec::new()));
        } else if let Some(stage) = stages.last_mut() {
            stage.2.push(line);
        }
    }
    let mut stage = stages.last().expect("Dockerfile has a FROM");
    loop {
        if let Some(line) = stage
            .2
            .iter()
            .rfind(|l| l.starts_with(&format!("{keyword} ")))
        {
            return serde_json::from_str(line[keyword.len()..].trim()).unwrap_or_else(|e| {
                panic!("Dockerfile: {keyword} is not in exec form ({e}): {line}")
            });
        }
        stage = stages
            .iter()
            .find(|s| s.0 == Some(stage.1))
            .unwrap_or_else(|| panic!("Dockerfile: no {keyword} in the default stage's chain"));
    }
}

fn strings(v: &serde_norway::Value) -> Vec<String> {
    v.as_sequence()
        .expect("a list")
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

/// Every YAML document in a file.
fn yaml_docs(path: &Path) -> Vec<serde_norway::Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).expect("read");
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The file a pod sees at `path`, when a volume mount puts a ConfigMap key there (a
/// directory mount of the ConfigMap, or a `subPath` mount of one key).
fn mounted_config_map_file(
    docs: &[serde_norway::Value],
    pod: &serde_norway::Value,
    container: &serde_norway::Value,
    path: &str,
) -> Option<String> {
    for mount in container["volumeMounts"].as_sequence()? {
        let mount_path = mount["mountPath"].as_str()?;
        let key = match mount["subPath"].as_str() {
            Some(sub) if mount_path == path => sub,
            Some(_) => continue,
            None => match path
                .strip_prefix(mount_path)
                .and_then(|r| r.strip_prefix('/'))
            {
                Some(rest) => rest,
                None => continue,
            },
        };
        let volume = pod["volumes"]
            .as_sequence()?
            .iter()
            .find(|v| v["name"] == mount["name"])?;
        let map_name = volume["configMap"]["name"].as_str()?;
        let map = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == map_name)?;
        return map["data"][key].as_str().map(str::to_owned);
    }
    None
}

/// Runs the real binary with a container's command line, `--print-default-config` put
/// before its arguments so nothing starts: clap parses and validates the whole command line
/// (a repeated `--config`, an unknown flag or subcommand fails with exit 2), then the binary
/// prints the default configuration and exits. (`--help` would not do: clap answers it
/// before it checks for repeated arguments.)
fn binary_accepts(argv: &[String]) -> Result<(), String> {
    if argv.first().map(String::as_str) != Some("/usr/local/bin/stowage") {
        return Err(format!(
            "{argv:?} does not run the image's /usr/local/bin/stowage"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("--print-default-config")
        .args(&argv[1..])
        .current_dir(dir.path())
        .output()
        .expect("run stowage");
    if !out.status.success() {
        return Err(format!(
            "stowage rejects {argv:?} ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        stowage::settings::DEFAULT_TOML,
        "the check must stop after parsing the arguments"
    );
    Ok(())
}

/// The value after `--config` (or `-c`) in a command line.
fn config_arg(argv: &[String]) -> Option<&str> {
    argv.windows(2)
        .find(|w| w[0] == "--config" || w[0] == "-c")
        .map(|w| w[1].as_str())
}

#[test]
fn dockerfile_command_line_starts_the_binary() {
    let dockerfile = repo("Dockerfile");
    let mut argv = dockerfile_exec(&dockerfile, "ENTRYPOINT");
    argv.extend(dockerfile_exec(&dockerfile, "CMD"));
    binary_accepts(&argv).unwrap_or_else(|e| panic!("Dockerfile ENTRYPOINT + CMD: {e}"));
    // The file it names is the one the image copies in.
    let config = config_arg(&argv).expect("the ENTRYPOINT names a config file");
    assert!(
        dockerfile
            .lines()
            .any(|l| l == format!("COPY docker/config.toml {config}")),
        "the Dockerfile does not COPY docker/config.toml to {config}"
    );
}

/// Every Stowage container in the Kubernetes examples, run as Kubernetes runs it: the
/// image's ENTRYPOINT (unless `command` replaces it) followed by `args` (or, without
/// them, the image's CMD). The binary must accept that command line, and the config file
/// it names must be a valid configuration that a ConfigMap mounts there.
#[test]
fn kubernetes_command_lines_start_the_binary() {
    let dockerfile = repo("Dockerfile");
    let entrypoint = dockerfile_exec(&dockerfile, "ENTRYPOINT");
    let cmd = dockerfile_exec(&dockerfile, "CMD");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/kubernetes") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let docs = yaml_docs(&path);
        for doc in &docs {
            let pod = &doc["spec"]["template"]["spec"];
            let Some(containers) = pod["containers"].as_sequence() else {
                continue;
            };
            for c in containers {
                if !c["image"].as_str().unwrap_or("").contains("stowage") {
                    continue;
                }
                let what = format!(
                    "{} container {}",
                    path.display(),
                    c["name"].as_str().unwrap_or("?")
                );
                let mut argv = match c.get("command") {
                    Some(command) => strings(command),
                    None => entrypoint.clone(),
                };
                match c.get("args") {
                    Some(args) => argv.extend(strings(args)),
                    None if c.get("command").is_none() => argv.extend(cmd.clone()),
                    None => {}
                }
                binary_accepts(&argv).unwrap_or_else(|e| panic!("{what}: {e}"));
                let config = config_arg(&argv).expect("the command line names a config file");
                let toml = mounted_config_map_file(&docs, pod, c, config)
                    .unwrap_or_else(|| panic!("{what}: no ConfigMap is mounted at {config}"));
                Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{what}: {config}: {e}"));
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 2,
        "expected the Stowage containers of deployment.yaml and replicas.yaml, found {checked}"
    );
}

#[test]
fn the_command_line_check_can_fail() {
    // What the Kubernetes examples used to pass: --config twice (ENTRYPOINT and args).
    let argv = [
        "/usr/local/bin/stowage",
        "--config",
        "/etc/stowage/config.toml",
        "--config",
        "/etc/stowage/config.toml",
        "run",
    ]
    .map(String::from);
    let err = binary_accepts(&argv).expect_err("a repeated --config was accepted");
    assert!(err.contains("cannot be used multiple times"), "{err}");
    let unknown = ["/usr/local/bin/stowage", "serve"].map(String::from);
    binary_accepts(&unknown).expect_err("an unknown subcommand was accepted");
}

/// The compose file with its commented-out YAML lines put back, as a user who follows its
/// comments would: indented comments that are a list item (`# - item`) or an environment
/// variable (`# UPPER_CASE: value`); prose comments stay.
fn uncomment_yaml_lines(text: &str) -> String {
    text.lines()
        .map(|l| {
            let indent = l.len() - l.trim_start().len();
            let Some(rest) = l.trim_start().strip_prefix("# ") else {
                return l.to_owned();
            };
            let key = rest.split_once(": ").map(|(k, _)| k).unwrap_or("");
            let is_yaml = rest.starts_with("- ")
                || (!key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'));
            if indent > 0 && is_yaml {
                format!("{}{rest}", &l[..indent])
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn compose_example_is_valid_as_shipped_and_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/docker-compose.yml");
    let text = std::fs::read_to_string(&path).expect("read");
    let image = Config::from_toml_str(&repo("docker/config.toml")).expect("docker/config.toml");
    let dockerfile = repo("Dockerfile");
    let config_path = config_arg(&dockerfile_exec(&dockerfile, "ENTRYPOINT"))
        .expect("ENTRYPOINT --config")
        .to_owned();

    let uncommented = uncomment_yaml_lines(&text);
    assert_ne!(
        uncommented, text,
        "the compose file has no commented lines to try"
    );
    for (what, yaml) in [("as shipped", &text), ("uncommented", &uncommented)] {
        let doc: serde_norway::Value = serde_norway::from_str(yaml)
            .unwrap_or_else(|e| panic!("examples/docker-compose.yml {what}: {e}\n{yaml}"));
        let svc = &doc["services"]["stowage"];
        let volumes = strings(&svc["volumes"]);
        let targets: Vec<&str> = volumes.iter().filter_map(|v| v.split(':').nth(1)).collect();
        // The named volumes hold what the image's configuration writes: cache and CA.
        for dir in [&image.cache.dir, &image.ca.dir] {
            assert!(
                targets.iter().any(|t| Path::new(t) == dir.as_path()),
                "{what}: no volume at {} ({volumes:?})",
                dir.display()
            );
        }
        assert_eq!(svc["read_only"], true, "{what}: read_only");
        if what == "uncommented" {
            assert!(
                volumes
                    .iter()
                    .any(|v| v.split(':').nth(1) == Some(config_path.as_str())),
                "{what}: the optional config mount does not land on the ENTRYPOINT's {config_path} ({volumes:?})"
            );
            assert!(
                svc["environment"].get("DOCKERHUB_TOKEN").is_some(),
                "{what}: DOCKERHUB_TOKEN"
            );
        }
    }
}

#[test]
fn uncommenting_keeps_prose_comments() {
    let text =
        "a:\n  # Prose: not yaml\n  # - item\n  # KEY: v\n  # in a mounted config): no\n# - top\n";
    assert_eq!(
        uncomment_yaml_lines(text),
        "a:\n  # Prose: not yaml\n  - item\n  KEY: v\n  # in a mounted config): no\n# - top"
    );
}

/// With GitLab's Docker executor the job container is linked to its services, but services
/// reach each other (dind → stowage) only when `FF_NETWORK_PER_BUILD` is set; without it
/// dind falls back from the mirror to Docker Hub without an error. Every job of the example
/// whose dind uses the stowage service as its mirror sets it, no job names an image that
/// nothing publishes, and `stowage setup gitlab` says the same.
#[test]
fn gitlab_dind_jobs_share_a_network_with_stowage() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gitlab-ci.yml");
    let docs = yaml_docs(&path);
    let ci = docs.first().expect("a YAML document");
    let set = |v: &serde_norway::Value| v == "true" || v == &serde_norway::Value::Bool(true);
    let mut dind_jobs = 0;
    for (name, job) in ci.as_mapping().expect("jobs") {
        let Some(services) = job["services"].as_sequence() else {
            continue;
        };
        for s in services {
            assert!(
                !s["name"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("stowage/stowage"),
                "{name:?}: no image stowage/stowage is published"
            );
        }
        let mirrors_to_stowage = services.iter().any(|s| {
            s["command"].as_sequence().is_some_and(|c| {
                c.iter().any(|a| {
                    a.as_str()
                        .unwrap_or("")
                        .starts_with("--registry-mirror=http://stowage:")
                })
            })
        });
        if mirrors_to_stowage {
            assert!(
                set(&job["variables"]["FF_NETWORK_PER_BUILD"])
                    || set(&ci["variables"]["FF_NETWORK_PER_BUILD"]),
                "{name:?}: dind mirrors to the stowage service without FF_NETWORK_PER_BUILD"
            );
            dind_jobs += 1;
        }
    }
    assert!(dind_jobs >= 1, "no dind job in {}", path.display());

    let config = Config::from_toml_str("[mirror]\nlisten = \"0.0.0.0:5000\"\n").unwrap();
    let snippet = stowage::admin::setup::snippet(
        "gitlab",
        &stowage::admin::setup::Reach::given(
            "10.1.2.3:3128",
            "127.0.0.1:3128".parse().unwrap(),
            None,
            "test",
        ),
        &config,
        "PEM",
    )
    .unwrap();
    // The snippet is this file, so the jobs checked above are what it prints.
    let files = stowage::admin::setup::files(&snippet);
    assert_eq!(files.len(), 1, "setup gitlab:\n{snippet}");
    assert_eq!(
        files[0].1,
        std::fs::read_to_string(&path).unwrap(),
        "setup gitlab:\n{snippet}"
    );
}

/// examples/README.md's table names every file in examples/, and every test it says runs
/// one exists: an e2e scenario, a test file, or a unit test by its name.
#[test]
fn the_examples_table_names_every_file_and_tests_that_exist() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let examples = repo.join("examples");
    let readme = std::fs::read_to_string(examples.join("README.md")).unwrap();
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&examples, &mut files);
    let containerd_row = readme
        .lines()
        .find(|l| l.starts_with("| `containerd/<registry>/hosts.toml`"))
        .expect("the containerd row");
    for f in &files {
        let rel = f.strip_prefix(&examples).unwrap().to_str().unwrap();
        if rel.ends_with("README.md") {
            continue;
        }
        let named = match rel.strip_prefix("containerd/") {
            Some(r) => {
                let dir = r
                    .strip_suffix("/hosts.toml")
                    .expect("containerd/<registry>/hosts.toml");
                containerd_row.contains(dir)
            }
            None => readme.contains(&format!("| `{rel}` |")),
        };
        assert!(named, "examples/README.md's table does not name {rel}");
    }
    let words = readme
        .split(|c: char| !(c.is_ascii_alphanumeric() || "._/-".contains(c)))
        .filter(|w| !w.is_empty());
    let mut checked = 0;
    for w in words {
        let w = w.trim_end_matches('.');
        let exists = if w.len() > 3
            && w.as_bytes()[..2].iter().all(u8::is_ascii_digit)
            && w.ends_with(".sh")
        {
            repo.join("tests/e2e")
                .join(w.trim_start_matches("tests/e2e/"))
                .exists()
        } else if w.starts_with("tests/") && (w.ends_with(".rs") || w.ends_with(".sh")) {
            repo.join(w).exists()
        } else {
            continue;
        };
        assert!(exists, "examples/README.md names {w}, which does not exist");
        checked += 1;
    }
    let setup_rs = std::fs::read_to_string(repo.join("src/admin/setup.rs")).unwrap();
    for unit in [
        "snippets_are_the_examples_filled_in",
        "tls_mirror_snippets_trust_the_ca",
    ] {
        assert!(
            readme.contains(unit) && setup_rs.contains(&format!("fn {unit}()")),
            "{unit}"
        );
    }
    assert!(checked > 10, "only {checked} tests named");
}
