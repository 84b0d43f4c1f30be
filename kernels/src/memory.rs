//! Device memory as the backend's allocator sees it, and a process-wide high-water mark that
//! training code samples at the points where memory peaks (after each forward segment and each
//! backward pass), so that logs report what was really held rather than what the pools reserve.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::MambaBackend;

/// One reading of a device's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes in live tensors.
    pub in_use: u64,
    /// Bytes the allocator holds from the device (its pools; what `nvidia-smi` sees, less the
    /// CUDA context).
    pub reserved: u64,
    /// The device's total memory, where the runtime reports it (CUDA).
    pub total: Option<u64>,
}

static TRACKING: AtomicBool = AtomicBool::new(false);
static PEAK_IN_USE: AtomicU64 = AtomicU64::new(0);
static PEAK_RESERVED: AtomicU64 = AtomicU64::new(0);

/// Turns sampling by [`sample`] on or off (off by default: a reading waits for the device's
/// queue).
pub fn set_tracking(on: bool) {
    TRACKING.store(on, Ordering::Relaxed);
}

/// Records a reading of `device` into the high-water marks, when tracking is on.
pub fn sample<B: MambaBackend>(device: &B::Device) {
    if !TRACKING.load(Ordering::Relaxed) {
        return;
    }
    if let Some(m) = B::memory_stats(device) {
        PEAK_IN_USE.fetch_max(m.in_use, Ordering::Relaxed);
        PEAK_RESERVED.fetch_max(m.reserved, Ordering::Relaxed);
    }
}

/// The high-water marks since the last [`reset_peaks`]: (bytes in use, bytes reserved).
pub fn peaks() -> (u64, u64) {
    (
        PEAK_IN_USE.load(Ordering::Relaxed),
        PEAK_RESERVED.load(Ordering::Relaxed),
    )
}

pub fn reset_peaks() {
    PEAK_IN_USE.store(0, Ordering::Relaxed);
    PEAK_RESERVED.store(0, Ordering::Relaxed);
}

/// Bytes as GiB, for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
