//! A small tmpfs mounted for one test (a real disk that fills), unmounted when dropped,
//! even when the test panics. Needs root (CI runs the tests as root); elsewhere `mount`
//! says why not, and the test skips with that reason.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `8m`) at `at`, creating it.
    pub fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not running as root".into());
        }
        std::fs::create_dir_all(at).map_err(|e| format!("{}: {e}", at.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(at.to_owned()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Bytes an unprivileged writer may still use.
    pub fn free(&self) -> u64 {
        let s = rustix::fs::statvfs(&self.0).expect("statvfs");
        s.f_bavail * s.f_frsize
    }

    /// Writes a file taking (nearly) every free byte, as another writer on the same disk
    /// would; returns its path. Write errors are expected at the very end.
    pub fn fill_up(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.0.join(name);
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.write_all(&[0u8; 1]);
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            // Something still holds a file open (a server task not yet gone): detach now,
            // the kernel frees it when the last file closes.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}
