//! The `bench` binary's measurements: the hot ops ([`kernels`]: the cubecl kernels against the
//! plain tensor-op reference, time and agreement) and a whole model ([`model`]: loss and every
//! parameter gradient with the kernels against the reference, and the time of a training step).
//!
//! Both switch the process-wide ops mode ([`mamba_kernels::set_ops_mode`]) between the
//! implementations they compare, so they must not run beside other model work. Timings are
//! medians over iterations, each bracketed by `B::sync` so that it covers the device's work and
//! not just its submission. Agreement is `‖k − r‖ / ‖r‖` per tensor, computed in f64 on the host
//! (a NaN or an infinity anywhere makes it infinite).

pub mod gemm;
pub mod generate;
pub mod host_profile;
pub mod kernels;
pub mod model;
pub mod train;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Serialize, Serializer};

/// Median wall time in ms of `f` on `device`, after `warmup` untimed runs; every run is bracketed
/// by device syncs. `iters` is at least 1.
pub fn time_ms<B: Backend>(
    device: &B::Device,
    warmup: usize,
    iters: usize,
    f: impl FnMut(),
) -> f64 {
    time_issue_ms::<B>(device, warmup, iters, f).0
}

/// As [`time_ms`], and beside the wall time the median time the host took to issue the work,
/// from the start until `f` returns (before the closing sync). An issue time close to the wall
/// time says the device waited on the host: the op is bound by its launches, not its kernels.
pub fn time_issue_ms<B: Backend>(
    device: &B::Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut(),
) -> (f64, f64) {
    let sync = || B::sync(device).expect("device sync");
    for _ in 0..warmup {
        f();
        sync();
    }
    let mut times = Vec::with_capacity(iters.max(1));
    let mut issued = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        sync();
        let start = Instant::now();
        f();
        issued.push(start.elapsed().as_secs_f64() * 1e3);
        sync();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    (median(times), median(issued))
}

/// The median; NaN for none.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs `f`, turning a panic (an out-of-memory error of the device, say) into its message.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panicked".into())
    })
}

/// `‖got − want‖ / ‖want‖` in f64; infinite when either holds a non-finite value or the lengths
/// differ. Two zero tensors agree (0).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().chain(want).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if num == 0.0 {
        0.0
    } else {
        num.sqrt() / den.sqrt()
    }
}

/// A tensor's values on the host, flattened.
pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

/// The largest error of a list of named errors, and its name (`None` for an empty list).
pub fn worst(errs: &[(String, f64)]) -> Option<(String, f64)> {
    errs.iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(n, e)| (n.clone(), *e))
}

/// An f64 for JSON: finite values as numbers, non-finite ones as the strings `"inf"`/`"nan"`
/// (JSON has no infinity, and serde_json would write `null`, which reads as "not measured").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Num(pub f64);

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_finite() {
            s.serialize_f64(self.0)
        } else if self.0.is_nan() {
            s.serialize_str("nan")
        } else {
            s.serialize_str(if self.0 > 0.0 { "inf" } else { "-inf" })
        }
    }
}

/// Where and when a benchmark ran: the head of every JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// What `--device` selected (`cuda:0`, `wgpu`, `cpu`).
    pub device: String,
    /// The burn backend's own name for it.
    pub backend: String,
    /// The GPU's name from `nvidia-smi`, when there is one.
    pub gpu: Option<String>,
    /// UTC, RFC 3339.
    pub timestamp: String,
    /// `$GIT_COMMIT`, else the commit the binary was built from (stamped by build.rs; uncommitted
    /// changes are not marked), else `git rev-parse HEAD` in the working directory, else null.
    pub commit: Option<String>,
    /// What ran the matrix products ([`mamba_kernels::MambaBackend::matmul_provider`]):
    /// `cublas`, `cublas-host-sync`, `cubecl` or `burn`.
    pub matmul: &'static str,
}

impl RunInfo {
    pub fn new<B: mamba_kernels::MambaBackend>(device: &B::Device, name: &str) -> Self {
        let gpu = if name.starts_with("cuda") {
            command_line("nvidia-smi", &["--query-gpu=name", "--format=csv,noheader"])
                .and_then(|s| s.lines().next().map(str::to_string))
        } else {
            None
        };
        Self {
            device: name.to_string(),
            backend: B::name(device),
            gpu,
            timestamp: utc_now(),
            commit: std::env::var("GIT_COMMIT")
                .ok()
                .filter(|s| !s.is_empty())
                .or_else(|| option_env!("MAMBA_BUILD_COMMIT").map(str::to_string))
                .or_else(|| command_line("git", &["rev-parse", "HEAD"])),
            matmul: B::matmul_provider(),
        }
    }

    /// One line for the readable reports.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} ({}, matmuls: {})",
            self.device, self.backend, self.matmul
        );
        if let Some(g) = &self.gpu {
            s += &format!(", {g}");
        }
        s += &format!(", {}", self.timestamp);
        if let Some(c) = &self.commit {
            s += &format!(", commit {}", &c[..c.len().min(12)]);
        }
        s
    }
}

/// The trimmed stdout of a command that succeeded, else `None`.
fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// The current time, UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stamp is a commit of this checkout's history: HEAD when built, so HEAD or one of its
    /// ancestors by the time the test runs (commits may land while tests build).
    #[test]
    fn build_commit_is_the_checkouts() {
        let stamped = option_env!("MAMBA_BUILD_COMMIT");
        let Some(head) = command_line("git", &["rev-parse", "HEAD"]) else {
            assert!(stamped.is_none(), "stamped without git");
            return;
        };
        let Some(stamp) = stamped else {
            panic!("built in a git checkout, yet not stamped");
        };
        assert!(
            stamp.len() == 40 && stamp.bytes().all(|b| b.is_ascii_hexdigit()),
            "{stamp}"
        );
        let ancestor = std::process::Command::new("git")
            .args(["merge-base", "--is-ancestor", stamp, &head])
            .status()
            .unwrap();
        assert!(
            ancestor.success(),
            "{stamp} is not HEAD ({head}) or an ancestor"
        );
    }

    #[test]
    fn metric_and_median() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[1.0, 0.0], &[0.0, 1.0]) - 2f64.sqrt()).abs() < 1e-12);
        assert!(rel_err(&[f32::NAN], &[1.0]).is_infinite());
        assert!(rel_err(&[1.0], &[f32::INFINITY]).is_infinite());
        assert!(rel_err(&[1.0], &[0.0]).is_infinite());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(
            serde_json::to_string(&Num(f64::INFINITY)).unwrap(),
            "\"inf\""
        );
        assert_eq!(serde_json::to_string(&Num(0.5)).unwrap(), "0.5");
    }

    #[test]
    fn timestamp_shape() {
        let t = utc_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
