//! Cleaning up after earlier fuzzing processes.

use std::path::Path;

/// Scratch directories of fuzzing processes that are gone (libFuzzer exits without
/// running destructors): `stowage-fuzz-*-<pid>` whose process no longer exists.
pub fn remove_stale(base: &Path) {
    for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("stowage-fuzz-")
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
