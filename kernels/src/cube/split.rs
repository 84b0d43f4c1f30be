//! [`crate::MambaBackend::split_last`] as views, and [`crate::MambaBackend::cat_last`] as one
//! kernel: two or three pieces side by side along the last dimension, each thread one vector of
//! the output (16 bytes) where every piece's width is whole vectors, else one element.
//!
//! The split's pieces are views of the input whenever a piece's first element keeps the
//! runtime's memory alignment (512 bytes on CUDA): the kernels that read them (conv, gated norm,
//! SSD) index through strides. burn's `narrow` (its `slice`) also asks the piece's *end* to be
//! aligned and copies the piece otherwise: at the Codestral-7B shape the `z` and `xBC` pieces of
//! the input projection (`[8192, 18560]` bf16 at 4 × 2,048) end 20,736 and 256 bytes before the
//! row's end, so each forward copied 300 MB a layer (`SliceKernel`, 120 ms of call K's 7B
//! profile). A view here binds from its start to the end of the input's buffer, which a kernel
//! never reads past the piece's shape. burn's `cat` on the cube backends is an
//! empty output and one slice-assign launch a piece, and its slice-assign moved the split's
//! gradients at about a fifth of the bandwidth a plain copy gets (7.4 ms a mamba2-130m step in
//! the H100 profile of call G1, for ~4 GB read and written).

use burn::tensor::{DType, Shape, Tensor as BTensor};
use burn_cubecl::{
    element::BoolElement, kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype,
    tensor::CubeTensor, CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use super::{elemwise, prim, wrap};

/// `out[r, col]` from piece `a`, `b` or (with `three`) `c`, all contiguous with the output's
/// rows: `a` holds the first `wa` columns, `b` the next `wb`, `c` the rest. Everything counts
/// vectors of `V` elements (one element where the widths are not whole vectors): `i` the output's
/// vector, `n` the output's vectors, `w` a row's.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn cat_last_kernel<F: Float, V: Size>(
    a: &Tensor<Vector<F, V>>,
    b: &Tensor<Vector<F, V>>,
    c: &Tensor<Vector<F, V>>,
    out: &mut Tensor<Vector<F, V>>,
    n: usize,
    w: usize,
    wa: usize,
    wb: usize,
    #[comptime] three: bool,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= n {
        terminate!();
    }
    let row = i / w;
    let col = i % w;
    if col < wa {
        out[i] = a[row * wa + col];
    } else if col < wa + wb {
        out[i] = b[row * wb + col - wa];
    } else if three {
        let wc = w - wa - wb;
        out[i] = c[row * wc + col - wa - wb];
    }
}

/// `x` `[.., width]` as pieces of `sizes` along the last dimension: views at aligned starts
/// (see the module), burn's `narrow` elsewhere. Panics unless `sizes` sum to `width`.
pub fn split_last<R, F, I, BT, const D: usize>(
    x: BTensor<CubeBackend<R, F, I, BT>, D>,
    sizes: &[usize],
) -> Vec<BTensor<CubeBackend<R, F, I, BT>, D>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let width = x.dims()[D - 1];
    assert_eq!(
        sizes.iter().sum::<usize>(),
        width,
        "split_last: pieces {sizes:?} do not add up to the width {width}"
    );
    let t = prim(x.clone());
    let align = t.client.properties().memory.alignment.max(1);
    let elem = t.dtype.size() as u64;
    let base = t.handle.offset_start.unwrap_or(0);
    let step = t.meta.strides()[D - 1] as u64 * elem;
    let mut start = 0;
    sizes
        .iter()
        .map(|&len| {
            let offset = start as u64 * step;
            let piece = if (base + offset).is_multiple_of(align) {
                let mut view: CubeTensor<R> = t.clone();
                view.handle = t.handle.clone().offset_start(offset);
                view.meta.shape_mut()[D - 1] = len;
                wrap(view)
            } else {
                x.clone().narrow(D - 1, start, len)
            };
            start += len;
            piece
        })
        .collect()
}

/// The kernel for two or three pieces of one float dtype whose leading dimensions agree;
/// `Tensor::cat` otherwise.
pub fn cat_last<R, F, I, BT, const D: usize>(
    pieces: Vec<BTensor<CubeBackend<R, F, I, BT>, D>>,
) -> BTensor<CubeBackend<R, F, I, BT>, D>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let fits = matches!(pieces.len(), 2 | 3) && {
        let dtype = pieces[0].dtype();
        let lead = &pieces[0].dims()[..D - 1];
        matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            && pieces
                .iter()
                .all(|p| p.dtype() == dtype && &p.dims()[..D - 1] == lead)
    };
    if !fits {
        return BTensor::cat(pieces, D - 1);
    }
    let dtype = pieces[0].dtype();
    let mut shape = pieces[0].dims();
    let widths: Vec<usize> = pieces.iter().map(|p| p.dims()[D - 1]).collect();
    shape[D - 1] = widths.iter().sum();
    let three = pieces.len() == 3;
    let prims: Vec<_> = pieces
        .into_iter()
        .map(|p| into_contiguous(prim(p)))
        .collect();
    let client = prims[0].client.clone();
    let out = empty_device_contiguous_dtype(
        client.clone(),
        prims[0].device.clone(),
        Shape::from(shape.to_vec()),
        dtype,
    );
    let n: usize = shape.iter().product();
    // Pieces are contiguous here; vectors need every width whole and every start aligned.
    let vs = client
        .io_optimized_vector_sizes(dtype.size())
        .find(|&vs| {
            widths.iter().all(|w| w % vs == 0)
                && prims
                    .iter()
                    .all(|p| p.handle.offset_start.unwrap_or(0) % (vs * dtype.size()) as u64 == 0)
        })
        .unwrap_or(1);
    if n > 0 {
        let nv = n / vs;
        let (count, dim) = elemwise(&client, nv);
        let c = if three { &prims[2] } else { &prims[0] };
        cat_last_kernel::launch::<R>(
            &client,
            count,
            dim,
            vs,
            prims[0].clone().into_tensor_arg(),
            prims[1].clone().into_tensor_arg(),
            c.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            nv,
            shape[D - 1] / vs,
            widths[0] / vs,
            widths[1] / vs,
            three,
            dtype.into(),
        );
    }
    wrap(out)
}
