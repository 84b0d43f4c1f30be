//! The matrix products of the cube backend on CUDA, by cuBLAS.
//!
//! cubecl 0.10's matmuls (cubek-matmul 0.2) have no Hopper `wgmma` path: in the Codestral-7B
//! training step they ran the projections at ~230 TFLOP/s where cuBLAS runs the same products at
//! ~700 (BENCHMARKS.md), and on a fresh machine every distinct problem is autotuned by compiling
//! ~30 candidate kernels, minutes before the first step. So on CUDA, [`MambaBackend::matmul_t`]
//! (the three products of every linear layer and the LM head, `crate::linear`) calls
//! `cublasGemmEx` on the tensors' device memory: f32 accumulation, bf16/f16/f32 operands (f32 ones
//! through TF32 unless `MAMBA_F32_MATMUL=highest`, [`crate::linear::f32_matmul`]) read transposed
//! or not as they lie (any row or column stride), the output a fresh contiguous tensor.
//!
//! cuBLAS runs on cubecl's own stream for the calling thread, so its products are ordered with
//! cubecl's kernels exactly as another kernel would be: no waits, no extra launches. cubecl 0.10
//! does not expose that stream, so it is read once per (device, thread) from CUPTI's callback on
//! `cuLaunchKernel` while a one-thread probe kernel is launched through cubecl (cubecl keeps one
//! stream per thread for the process's life). Where CUPTI cannot be loaded or refuses (another
//! profiler subscribed, say), cuBLAS gets a stream of its own and the host orders the two:
//! cubecl's stream is synchronised before each product and cuBLAS's after it. That costs
//! ~90 µs a product (measured on an H200), more than the product itself below ~10 GFLOP, so it
//! is the fallback, named in `matmul_provider` (`cublas-host-sync`) and on stderr.
//! (A GPU-side hand-over between two streams, a spinning kernel on cubecl's and
//! `cuStreamWaitValue32` on cuBLAS's, was tried and dropped: the driver refused the wait on the
//! H100 it ran on, and a spinner can deadlock against the driver's lazy loading of a cuBLAS
//! kernel.)
//!
//! libcublas is loaded at run time (`libcublas.so.13` or another version cudarc knows, from the
//! library path). Without it, or with `MAMBA_GEMM=cubecl`, or when cuBLAS refuses a call, the
//! products are cubecl's, as before; the first fallback says so on stderr.
//!
//! [`MambaBackend::matmul_t`]: crate::MambaBackend::matmul_t

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use cudarc::cublas::sys as cb;
use cudarc::cupti::sys as cp;
use cudarc::driver::sys as cu;

use crate::linear::{f32_matmul, F32Matmul};

/// Which implementation runs the cube backend's matrix products on CUDA (`MAMBA_GEMM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmRoute {
    /// cuBLAS when it loads, cubecl's matmul otherwise (`auto` or `cublas`, the default).
    Cublas,
    /// cubecl's (autotuned) matmul, as before cuBLAS was used (`cubecl`).
    Cubecl,
}

/// `MAMBA_GEMM=auto|cublas|cubecl`, read once; an unknown value warns and means `auto`.
pub fn gemm_route() -> GemmRoute {
    static ROUTE: OnceLock<GemmRoute> = OnceLock::new();
    *ROUTE.get_or_init(
        || match std::env::var("MAMBA_GEMM").as_deref().map(str::trim) {
            Err(_) | Ok("") | Ok("auto") | Ok("cublas") => GemmRoute::Cublas,
            Ok("cubecl") => GemmRoute::Cubecl,
            Ok(other) => {
                eprintln!(
                    "warning: MAMBA_GEMM=`{other}` is not auto, cublas or cubecl; using auto"
                );
                GemmRoute::Cublas
            }
        },
    )
}

/// The smallest product (`2 m n k` floating-point operations) sent to cuBLAS in a decode step
/// ([`crate::linear::decode_products`]); smaller ones run on cubecl's matmul. Each cuBLAS product
/// waits, on the host, for cubecl's server thread to launch everything queued before it (that is
/// how it is ordered after them, see [`gemm`]); for a decode step's small products that wait
/// costs more than cuBLAS saves. On an H100 (BENCHMARKS.md, 12-06) the Codestral-7B shape
/// decoded at batch 1 (0.15 GFLOP products) in 19.2 ms a token this way against 29.4 ms with
/// every product on cuBLAS, and mamba2-130m at batch 32 in 5.7 against 7.5 ms. Outside decode
/// steps every product goes to cuBLAS: with training's small products (LoRA's rank-8 ones) on
/// cubecl, its autotuning kept the first step of the LoRA job from finishing within 150 s.
const DECODE_MIN_FLOP: f64 = 1e9;

thread_local! {
    /// Whether this thread is inside [`crate::linear::decode_products`].
    static DECODE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's products sized as a decode step's (see [`DECODE_MIN_FLOP`]).
pub fn in_decode<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            DECODE.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DECODE.with(|d| d.replace(true)));
    f()
}

/// The smallest product this thread sends to cuBLAS now: `MAMBA_CUBLAS_MIN_FLOP` when set
/// (read once; `0` sends every product, decode steps included), else [`DECODE_MIN_FLOP`] inside
/// decode steps and 0 outside.
pub fn cublas_min_flop() -> f64 {
    static ENV: OnceLock<Option<f64>> = OnceLock::new();
    let env = *ENV.get_or_init(|| {
        match std::env::var("MAMBA_CUBLAS_MIN_FLOP")
            .as_deref()
            .map(str::trim)
        {
            Err(_) | Ok("") => None,
            Ok(v) => match v.parse::<f64>() {
                Ok(x) if x >= 0.0 => Some(x),
                _ => {
                    eprintln!("warning: MAMBA_CUBLAS_MIN_FLOP=`{v}` is not a number ≥ 0; ignored");
                    None
                }
            },
        }
    });
    env.unwrap_or_else(|| {
        if DECODE.with(Cell::get) {
            DECODE_MIN_FLOP
        } else {
            0.0
        }
    })
}

/// How a (device, thread)'s products are ordered with cubecl's kernels.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// cuBLAS runs on cubecl's stream (read through CUPTI).
    CubeclStream,
    /// cuBLAS runs on a stream of its own; the host waits for each side (the fallback).
    HostSync,
}

/// One (device, thread)'s cuBLAS handle and the stream it runs on.
struct Blas {
    handle: cb::cublasHandle_t,
    stream: cu::CUstream,
    ctx: cu::CUcontext,
    order: Order,
}

thread_local! {
    /// This thread's cuBLAS state per device index (cubecl gives every thread its own stream).
    static BLAS: RefCell<HashMap<usize, Blas>> = RefCell::new(HashMap::new());
}

/// Set once cuBLAS has failed or cannot be loaded: every later product goes to cubecl.
static DISABLED: AtomicBool = AtomicBool::new(false);
static LOADED: OnceLock<bool> = OnceLock::new();
/// Set when some thread fell back to host synchronisation (reported by `provider`).
static HOST_SYNC: AtomicBool = AtomicBool::new(false);

fn disable(why: &str) {
    if !DISABLED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "warning: cuBLAS is not used ({why}); the matrix products run on cubecl's matmul"
        );
    }
}

/// Whether products on CUDA go to cuBLAS now (route, library present, no failure yet).
pub fn cublas_active() -> bool {
    if gemm_route() == GemmRoute::Cubecl || DISABLED.load(Ordering::Relaxed) {
        return false;
    }
    // SAFETY: loading a shared library by name; cudarc tries the names it knows.
    let loaded = *LOADED.get_or_init(|| unsafe { cb::is_culib_present() });
    if !loaded {
        disable("libcublas could not be loaded from the library path");
    }
    loaded
}

/// What `matmul_t` runs on for CUDA tensors now: `cublas`, `cublas-host-sync` once some thread
/// had to fall back to host synchronisation, or `cubecl`.
pub fn provider() -> &'static str {
    if !cublas_active() {
        "cubecl"
    } else if HOST_SYNC.load(Ordering::Relaxed) {
        "cublas-host-sync"
    } else {
        "cublas"
    }
}

/// One thread writes one value: a launch through cubecl whose stream CUPTI reports
/// ([`PROBE_BLOCK`]).
#[cube(launch)]
fn probe_kernel(out: &mut Array<u32>) {
    if UNIT_POS == 0 {
        out[0] = 1u32;
    }
}

/// `cuLaunchKernel`'s parameters as CUPTI passes them (`cuLaunchKernel_params` of CUDA's
/// `generated_cuda_meta.h`).
#[repr(C)]
struct LaunchParams {
    f: cu::CUfunction,
    grid: [u32; 3],
    block: [u32; 3],
    shared_mem_bytes: u32,
    stream: cu::CUstream,
}

/// The probe's launch shape: one cube of 7 × 3 × 1 threads, a shape no other kernel of ours or
/// burn's uses, so that its launch is told apart from other threads' launches in the callback
/// (cubecl launches from its own server thread, not the caller's).
const PROBE_BLOCK: [u32; 3] = [7, 3, 1];

/// While a probe runs: `Some(None)`, then `Some(Some(stream))` once its launch is seen.
static CAPTURED: Mutex<Option<Option<usize>>> = Mutex::new(None);
/// One probe at a time (CUPTI takes one subscriber per process).
static PROBING: Mutex<()> = Mutex::new(());

unsafe extern "C" fn on_driver_call(
    _userdata: *mut c_void,
    domain: cp::CUpti_CallbackDomain,
    cbid: cp::CUpti_CallbackId,
    data: *const c_void,
) {
    use cp::CUpti_driver_api_trace_cbid_enum as Id;
    if domain != cp::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API
        || (cbid != Id::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel as u32
            && cbid != Id::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel_ptsz as u32)
        || data.is_null()
    {
        return;
    }
    // SAFETY: CUPTI passes its callback data, whose parameters for these two ids are
    // `cuLaunchKernel_params`.
    let data = unsafe { &*(data as *const cp::CUpti_CallbackData) };
    if data.callbackSite != cp::CUpti_ApiCallbackSite::CUPTI_API_ENTER
        || data.functionParams.is_null()
    {
        return;
    }
    let params = unsafe { &*(data.functionParams as *const LaunchParams) };
    if params.block != PROBE_BLOCK || params.grid != [1, 1, 1] {
        return;
    }
    if let Ok(mut slot) = CAPTURED.lock() {
        if slot.is_some() {
            *slot = Some(Some(params.stream as usize));
        }
    }
}

/// The stream cubecl launches this thread's kernels on for `t`'s device, read from CUPTI's
/// driver callback around one probe launch.
fn cubecl_stream(t: &CubeTensor<CudaRuntime>) -> Result<cu::CUstream, String> {
    // SAFETY: loading a shared library by name.
    if !unsafe { cp::is_culib_present() } {
        return Err("libcupti could not be loaded from the library path".into());
    }
    let _probing = PROBING.lock().map_err(|_| "the probe lock is poisoned")?;
    let cupti = |what: &str, r: cp::CUptiResult| r.result().map_err(|e| format!("{what}: {e:?}"));
    let set = |v: Option<Option<usize>>| {
        std::mem::replace(&mut *CAPTURED.lock().expect("capture slot"), v)
    };
    let mut sub: cp::CUpti_SubscriberHandle = std::ptr::null_mut();
    let client = t.client.clone();
    // Everything submitted so far is launched first, outside the capture.
    cubecl::future::block_on(client.sync()).map_err(|e| format!("cubecl sync: {e:?}"))?;
    // SAFETY: CUPTI's documented subscribe / enable / unsubscribe sequence; the callback only
    // reads its arguments and writes the capture slot.
    unsafe {
        cupti(
            "cuptiSubscribe",
            cp::cuptiSubscribe(&mut sub, Some(on_driver_call), std::ptr::null_mut()),
        )?;
        let enabled = cupti(
            "cuptiEnableDomain",
            cp::cuptiEnableDomain(1, sub, cp::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API),
        );
        set(Some(None));
        let launched = enabled.and_then(|_| {
            let out = client.empty(4);
            let out = CubeTensor::new_contiguous(
                client.clone(),
                t.device.clone(),
                [1].into(),
                out,
                DType::U32,
            );
            let [x, y, z] = PROBE_BLOCK;
            probe_kernel::launch::<CudaRuntime>(
                &client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_3d(x, y, z),
                out.into_array_arg(),
            );
            // cubecl launches on its server thread: wait until it has.
            cubecl::future::block_on(client.sync()).map_err(|e| format!("cubecl sync: {e:?}"))
        });
        let seen = set(None).flatten();
        cupti("cuptiUnsubscribe", cp::cuptiUnsubscribe(sub))?;
        launched?;
        match seen {
            Some(s) if s != 0 => Ok(s as cu::CUstream),
            Some(_) => Err("cubecl launched on the legacy default stream".into()),
            None => Err("CUPTI reported no launch of cubecl's probe".into()),
        }
    }
}

fn driver<T>(what: &str, r: Result<T, cudarc::driver::DriverError>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e:?}"))
}

impl Blas {
    fn new(t: &CubeTensor<CudaRuntime>) -> Result<Self, String> {
        let index = t.device.index;
        let captured = cubecl_stream(t);
        // SAFETY: plain driver and cuBLAS calls; the primary context is the one cubecl retained
        // for this device, made current on this thread before the handle is created on it.
        unsafe {
            use cudarc::driver::result as d;
            let dev = driver("cuDeviceGet", d::device::get(index as i32))?;
            let ctx = driver("cuDevicePrimaryCtxRetain", d::primary_ctx::retain(dev))?;
            driver("cuCtxSetCurrent", d::ctx::set_current(ctx))?;
            let (stream, order) = match captured {
                Ok(s) => (s, Order::CubeclStream),
                Err(why) => {
                    eprintln!(
                        "note: cuBLAS cannot run on cubecl's stream ({why}); each product waits on the host instead (slower)"
                    );
                    HOST_SYNC.store(true, Ordering::Relaxed);
                    let own = driver(
                        "cuStreamCreate",
                        d::stream::create(d::stream::StreamKind::NonBlocking),
                    )?;
                    (own, Order::HostSync)
                }
            };
            let handle = cudarc::cublas::result::create_handle()
                .map_err(|e| format!("cublasCreate: {e:?}"))?;
            cudarc::cublas::result::set_stream(handle, stream as cb::cudaStream_t)
                .map_err(|e| format!("cublasSetStream: {e:?}"))?;
            Ok(Self {
                handle,
                stream,
                ctx,
                order,
            })
        }
    }

    /// Enqueues `product` ordered with cubecl's kernels (see [`Order`]).
    fn run(
        &self,
        client: &cubecl::client::ComputeClient<CudaRuntime>,
        product: impl FnOnce(&Self) -> Result<(), String>,
    ) -> Result<(), String> {
        use cudarc::driver::result as d;
        // SAFETY: the context and stream are this state's own and live.
        unsafe {
            match self.order {
                Order::CubeclStream => {
                    driver("cuCtxSetCurrent", d::ctx::set_current(self.ctx))?;
                    product(self)
                }
                Order::HostSync => {
                    cubecl::future::block_on(client.sync())
                        .map_err(|e| format!("cubecl sync: {e:?}"))?;
                    driver("cuCtxSetCurrent", d::ctx::set_current(self.ctx))?;
                    product(self)?;
                    driver("cuStreamSynchronize", d::stream::synchronize(self.stream))
                }
            }
        }
    }
}

/// How a 2-D operand lies in memory, as cuBLAS (column-major) sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// The memory holds the tensor column by column (a transposed view of a row-major tensor).
    col_major: bool,
    /// The leading dimension (elements between columns of the column-major view).
    ld: usize,
}

/// `Some` when cuBLAS can read a `[rows, cols]` tensor with these strides as it lies: rows or
/// columns unit-strided, the other stride at least the extent it skips over.
fn layout(shape: [usize; 2], strides: [usize; 2]) -> Option<Layout> {
    let [r, c] = shape;
    let [s0, s1] = strides;
    if (s1 == 1 || c == 1) && (r == 1 || s0 >= c) {
        let ld = if r == 1 { c } else { s0 };
        return Some(Layout {
            col_major: false,
            ld: ld.max(1),
        });
    }
    if (s0 == 1 || r == 1) && (c == 1 || s1 >= r) {
        let ld = if c == 1 { r } else { s1 };
        return Some(Layout {
            col_major: true,
            ld: ld.max(1),
        });
    }
    None
}

fn dims(t: &CubeTensor<CudaRuntime>) -> ([usize; 2], [usize; 2]) {
    let shape = t.meta.shape();
    let strides = t.meta.strides();
    ([shape[0], shape[1]], [strides[0], strides[1]])
}

/// The operand as cuBLAS can read it: the tensor itself, or a contiguous copy.
fn readable(t: CubeTensor<CudaRuntime>) -> (CubeTensor<CudaRuntime>, Layout) {
    let (shape, strides) = dims(&t);
    match layout(shape, strides) {
        Some(l) => (t, l),
        None => {
            let t = into_contiguous(t);
            let (shape, _) = dims(&t);
            let l = Layout {
                col_major: false,
                ld: shape[1].max(1),
            };
            (t, l)
        }
    }
}

fn cuda_type(dtype: DType) -> Option<cb::cudaDataType> {
    match dtype {
        DType::F32 => Some(cb::cudaDataType::CUDA_R_32F),
        DType::BF16 => Some(cb::cudaDataType::CUDA_R_16BF),
        DType::F16 => Some(cb::cudaDataType::CUDA_R_16F),
        _ => None,
    }
}

/// `op(a) · op(b)` by cuBLAS when `R` is CUDA, cuBLAS is active and the product is at least
/// [`cublas_min_flop`]; `None` leaves the product to the caller (another runtime, another dtype,
/// an empty or small product, cuBLAS off or failed).
pub fn matmul_t<R: CubeRuntime>(
    a: &CubeTensor<R>,
    b: &CubeTensor<R>,
    ta: bool,
    tb: bool,
) -> Option<CubeTensor<R>> {
    let a = (a as &dyn Any).downcast_ref::<CubeTensor<CudaRuntime>>()?;
    let b = (b as &dyn Any).downcast_ref::<CubeTensor<CudaRuntime>>()?;
    if a.dtype != b.dtype || cuda_type(a.dtype).is_none() || !cublas_active() {
        return None;
    }
    let (sa, _) = dims(a);
    let (sb, _) = dims(b);
    let (m, k) = if ta { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
    let (kb, n) = if tb { (sb[1], sb[0]) } else { (sb[0], sb[1]) };
    if k != kb || m == 0 || n == 0 || k == 0 || [m, n, k].iter().any(|&d| d > i32::MAX as usize) {
        return None;
    }
    if 2.0 * m as f64 * n as f64 * (k as f64) < cublas_min_flop() {
        return None;
    }
    match gemm(a.clone(), b.clone(), ta, tb, [m, n, k], None) {
        Ok(out) => (Box::new(out) as Box<dyn Any>)
            .downcast::<CubeTensor<R>>()
            .ok()
            .map(|t| *t),
        Err(why) => {
            disable(&why);
            None
        }
    }
}

/// `acc += op(a) · op(b)` by cuBLAS in `acc`'s own memory (`beta = 1`), under the conditions of
/// [`matmul_t`] and when `acc` is a contiguous `[m, n]` tensor of the operands' dtype that
/// nothing else holds (a fresh product); `Err(acc)` hands it back untouched otherwise.
// The `Err` is the caller's own tensor handed back (moved), not an error value to shrink.
#[allow(clippy::result_large_err)]
pub fn matmul_t_into<R: CubeRuntime>(
    acc: CubeTensor<R>,
    a: &CubeTensor<R>,
    b: &CubeTensor<R>,
    ta: bool,
    tb: bool,
) -> Result<CubeTensor<R>, CubeTensor<R>> {
    let (Some(a), Some(b)) = (
        (a as &dyn Any).downcast_ref::<CubeTensor<CudaRuntime>>(),
        (b as &dyn Any).downcast_ref::<CubeTensor<CudaRuntime>>(),
    ) else {
        return Err(acc);
    };
    if a.dtype != b.dtype
        || a.dtype != acc.dtype
        || cuda_type(a.dtype).is_none()
        || !cublas_active()
    {
        return Err(acc);
    }
    let (sa, _) = dims(a);
    let (sb, _) = dims(b);
    let (m, k) = if ta { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
    let (kb, n) = if tb { (sb[1], sb[0]) } else { (sb[0], sb[1]) };
    let shape = acc.meta.shape();
    let fits = shape.num_dims() == 2
        && shape[0] == m
        && shape[1] == n
        && acc.meta.strides()[1] == 1
        && acc.meta.strides()[0] == n
        && acc.can_mut();
    if !fits
        || k != kb
        || m == 0
        || n == 0
        || k == 0
        || [m, n, k].iter().any(|&d| d > i32::MAX as usize)
        || 2.0 * m as f64 * n as f64 * (k as f64) < cublas_min_flop()
    {
        return Err(acc);
    }
    let acc = match (Box::new(acc) as Box<dyn Any>).downcast::<CubeTensor<CudaRuntime>>() {
        Ok(t) => *t,
        Err(_) => unreachable!("a and b are CUDA tensors, so acc is"),
    };
    match gemm(a.clone(), b.clone(), ta, tb, [m, n, k], Some(acc.clone())) {
        Ok(out) => Ok(*(Box::new(out) as Box<dyn Any>)
            .downcast::<CubeTensor<R>>()
            .expect("R is CUDA")),
        Err(why) => {
            // cuBLAS did not run; `acc` is as it was.
            disable(&why);
            Err(*(Box::new(acc) as Box<dyn Any>)
                .downcast::<CubeTensor<R>>()
                .expect("R is CUDA"))
        }
    }
}

fn gemm(
    a: CubeTensor<CudaRuntime>,
    b: CubeTensor<CudaRuntime>,
    ta: bool,
    tb: bool,
    [m, n, k]: [usize; 3],
    acc: Option<CubeTensor<CudaRuntime>>,
) -> Result<CubeTensor<CudaRuntime>, String> {
    let dtype = a.dtype;
    let ty = cuda_type(dtype).ok_or("unsupported dtype")?;
    let (a, la) = readable(a);
    let (b, lb) = readable(b);
    let client = a.client.clone();
    let index = a.device.index;
    // With `acc` (contiguous `[m, n]`, checked by the caller) the product is added into it.
    let beta = if acc.is_some() { 1.0f32 } else { 0.0f32 };
    let out = acc.unwrap_or_else(|| {
        empty_device_contiguous_dtype(client.clone(), a.device.clone(), [m, n].into(), dtype)
    });

    // Pointers to the operands' memory. `get_resource` also makes this thread's stream wait for
    // any other cubecl stream that last wrote them, and, being a blocking call to cubecl's server
    // thread, returns only once every launch submitted before it is on the stream: the product
    // enqueued next follows them, and what is submitted after this call follows the product.
    let ptr = |t: &CubeTensor<CudaRuntime>| {
        client
            .get_resource(t.handle.clone())
            .map(|r| r.resource().ptr)
            .map_err(|e| format!("cubecl get_resource: {e:?}"))
    };
    let (pa, pb, pc) = (ptr(&a)?, ptr(&b)?, ptr(&out)?);

    // Row-major C[m, n] = op(A) · op(B) is column-major Cᵀ[n, m] = op(B)ᵀ · op(A)ᵀ; a row-major
    // operand read column-major is its transpose, so an operand is read transposed exactly when
    // its `op` and its storage disagree.
    let op = |t: bool, l: Layout| {
        if t != l.col_major {
            cb::cublasOperation_t::CUBLAS_OP_T
        } else {
            cb::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let compute = match (dtype, f32_matmul()) {
        (DType::F32, F32Matmul::High) => cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        _ => cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
    };
    let alpha = 1.0f32;
    let product = |blas: &Blas| {
        // SAFETY: the pointers are live device allocations of the stated shapes and leading
        // dimensions, ordered after the kernels that wrote them and before those that read `c`.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                blas.handle,
                op(tb, lb),
                op(ta, la),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                pb as *const c_void,
                ty,
                lb.ld as i32,
                pa as *const c_void,
                ty,
                la.ld as i32,
                &beta as *const f32 as *const c_void,
                pc as *mut c_void,
                ty,
                n as i32,
                compute,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("cublasGemmEx ({m}×{k}·{k}×{n}, {dtype:?}): {e:?}"))
    };
    BLAS.with(|cell| {
        let mut map = cell.borrow_mut();
        let blas = match map.entry(index) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Blas::new(&a)?),
        };
        blas.run(&client, product)
    })?;
    // The operands' tensors may be dropped now: cubecl reuses their memory only in kernels
    // queued behind the product on the same stream (or, host-synchronised, after it).
    drop((a, b));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_steps_keep_small_products_off_cublas() {
        // The environment's override would replace both thresholds; CI does not set it.
        assert!(
            std::env::var_os("MAMBA_CUBLAS_MIN_FLOP").is_none(),
            "unset MAMBA_CUBLAS_MIN_FLOP to run this test"
        );
        assert_eq!(
            cublas_min_flop(),
            0.0,
            "outside a decode step every product"
        );
        let (outer, nested) = crate::linear::decode_products(|| {
            let nested = crate::linear::decode_products(cublas_min_flop);
            (cublas_min_flop(), nested)
        });
        assert_eq!((outer, nested), (DECODE_MIN_FLOP, DECODE_MIN_FLOP));
        assert_eq!(cublas_min_flop(), 0.0, "restored after the step");
        let unwound = std::panic::catch_unwind(|| {
            crate::linear::decode_products(|| panic!("a failing decode step"))
        });
        assert!(unwound.is_err());
        assert_eq!(cublas_min_flop(), 0.0, "restored after a panic");
    }

    #[test]
    fn layouts_cublas_can_read() {
        // Row-major, contiguous and pitched.
        assert_eq!(
            layout([4, 3], [3, 1]),
            Some(Layout {
                col_major: false,
                ld: 3
            })
        );
        assert_eq!(
            layout([4, 3], [8, 1]),
            Some(Layout {
                col_major: false,
                ld: 8
            })
        );
        // A transposed view of a row-major [3, 4]: column-major, ld 4.
        assert_eq!(
            layout([4, 3], [1, 4]),
            Some(Layout {
                col_major: true,
                ld: 4
            })
        );
        // One row or one column: either, with a leading dimension cuBLAS accepts.
        assert_eq!(
            layout([1, 5], [0, 1]),
            Some(Layout {
                col_major: false,
                ld: 5
            })
        );
        assert_eq!(
            layout([5, 1], [1, 0]),
            Some(Layout {
                col_major: false,
                ld: 1
            })
        );
        // Overlapping or broadcast rows, or no unit stride: not readable as they lie.
        assert_eq!(layout([4, 3], [2, 1]), None);
        assert_eq!(layout([4, 3], [0, 1]), None);
        assert_eq!(layout([4, 3], [6, 2]), None);
    }
}
