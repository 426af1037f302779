//! Records the git commit the binary is built from (`stowage_build_info`), from
//! `STOWAGE_GIT_COMMIT` when set (builds from a tarball, the container image), else from
//! the local repository; `unknown` when neither is there. No network.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=STOWAGE_GIT_COMMIT");
    let commit = std::env::var("STOWAGE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let git = |args: &[&str]| {
                Command::new("git")
                    .args(args)
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .and_then(|o| String::from_utf8(o.stdout).ok())
                    .map(|s| s.trim().to_owned())
            };
            // Rebuild when HEAD moves (the files live in the common git dir for worktrees).
            let head_ref = git(&["symbolic-ref", "-q", "HEAD"]);
            for path in ["HEAD"].into_iter().chain(head_ref.as_deref()) {
                if let Some(p) = git(&["rev-parse", "--git-path", path]) {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=STOWAGE_GIT_COMMIT={commit}");
}
