//! Stamps the commit the binaries are built from (`MAMBA_BUILD_COMMIT`), so that a bench record
//! names the build it measured, not whatever checkout it happens to run in.

use std::path::Path;
use std::process::Command;

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // Rebuild the stamp when HEAD moves (a commit, a checkout).
    if let Some(dir) = git(&root, &["rev-parse", "--absolute-git-dir"]) {
        let dir = Path::new(&dir);
        // HEAD, the branch refs (a directory: cargo scans it, so a ref that a fresh clone kept
        // packed and a commit then writes loose is seen too), packed-refs. Only paths that
        // exist: a missing one would rerun this (and rebuild the crate) on every build.
        let watch = [
            dir.join("HEAD"),
            dir.join("refs/heads"),
            dir.join("packed-refs"),
        ];
        for f in watch.iter().filter(|f| f.exists()) {
            println!("cargo:rerun-if-changed={}", f.display());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(commit) = git(&root, &["rev-parse", "HEAD"]) {
        println!("cargo:rustc-env=MAMBA_BUILD_COMMIT={commit}");
    }
}
