//! Where compiled kernels are cached, keyed by the kernels' own source.
//!
//! cubecl's CUDA runtime caches PTX under a hash of each kernel's id (its type and launch
//! settings), not of its code: after a kernel's code changes (a new release, a local edit), a
//! cache written by the old build hands the new build the old PTX, which then reads its
//! arguments with the old layout. It did exactly that here once: an SSD kernel whose `A` changed
//! from the activations' dtype to f32 ran the cached bf16 PTX and trained on NaNs.
//!
//! So the compilation cache lives in a directory named after a hash of this crate's kernel
//! sources and version ([`KERNELS_HASH`]), under the root `cubecl.toml` names (`target/` for
//! `cache = "target"`). Autotune results (keyed by the same ids, but they only pick among
//! candidate kernels) stay where `cubecl.toml` puts them.

use cubecl::config::cache::CacheConfig;
use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

const fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// FNV-1a over every kernel source of this crate and its version.
pub const KERNELS_HASH: u64 = {
    let mut h = 0xcbf2_9ce4_8422_2325;
    h = fnv1a(h, env!("CARGO_PKG_VERSION").as_bytes());
    h = fnv1a(h, include_str!("conv.rs").as_bytes());
    h = fnv1a(h, include_str!("gemv.rs").as_bytes());
    h = fnv1a(h, include_str!("norm.rs").as_bytes());
    h = fnv1a(h, include_str!("optim.rs").as_bytes());
    h = fnv1a(h, include_str!("selective.rs").as_bytes());
    h = fnv1a(h, include_str!("ssd.rs").as_bytes());
    h = fnv1a(h, include_str!("ssd_bwd.rs").as_bytes());
    h = fnv1a(h, include_str!("step.rs").as_bytes());
    h = fnv1a(h, include_str!("tile.rs").as_bytes());
    h
};

/// The directory compiled kernels go to under `root`.
pub fn kernel_cache_dir(root: &std::path::Path) -> std::path::PathBuf {
    root.join(format!("mamba-kernels-{KERNELS_HASH:016x}"))
}

/// Reads `cubecl.toml` (and cubecl's environment overrides) as cubecl would, moves the
/// compilation cache into [`kernel_cache_dir`], and installs the result as cubecl's global
/// config. Call once at start-up, before any device is used; later calls do nothing. Returns
/// the cache directory, if caching is on.
pub fn configure_kernel_cache() -> Option<std::path::PathBuf> {
    static DONE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let mut cfg = CubeClRuntimeConfig::from_current_dir().override_from_env();
        let dir = cfg
            .compilation
            .cache
            .as_ref()
            .map(|c| kernel_cache_dir(&c.root()));
        if let Some(d) = &dir {
            cfg.compilation.cache = Some(CacheConfig::File(d.clone()));
        }
        // A config already read (a device used before this call) stays as it was.
        if CubeClRuntimeConfig::storage().lock().is_some() {
            return None;
        }
        CubeClRuntimeConfig::set(cfg);
        dir
    })
    .clone()
}

/// The compilation cache cubecl's global config names now (`None`: caching off, or not a
/// directory of its own).
pub fn current_kernel_cache() -> Option<std::path::PathBuf> {
    match &CubeClRuntimeConfig::get().compilation.cache {
        Some(CacheConfig::File(p)) => Some(p.clone()),
        _ => None,
    }
}
