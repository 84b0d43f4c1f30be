//! Compiled kernels are cached per kernel source: the directory cubecl's compilation cache is
//! pointed at carries a hash of the kernels' code, so a cache written by an older build is never
//! handed to a newer one (cubecl keys its PTX cache by kernel id only).

use mamba_burn::kernels::cube::cache::{
    configure_kernel_cache, current_kernel_cache, kernel_cache_dir, KERNELS_HASH,
};

#[test]
fn compiled_kernels_are_cached_per_kernel_source() {
    // cubecl.toml at the repository root says `cache = "target"`.
    let dir = configure_kernel_cache().expect("the compilation cache is on");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    assert_eq!(dir, kernel_cache_dir(&root));
    assert_eq!(
        dir.file_name().unwrap().to_str().unwrap(),
        format!("mamba-kernels-{KERNELS_HASH:016x}")
    );
    assert_eq!(current_kernel_cache().as_ref(), Some(&dir));
    // Once per process: the second call reports the same directory.
    assert_eq!(configure_kernel_cache(), Some(dir));
}
