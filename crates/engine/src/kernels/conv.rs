//! 2-D convolution as one matrix product per tile of output positions, the tile's im2col matrix built
//! from row copies of a zero-padded input (no whole-image im2col buffer, no layout change). In f32,
//! 3×3 stride-1 convolutions over large maps go to [`super::winograd`] instead; in bf16, 3×3 stride-1
//! ones whose weights were packed in Winograd form go to [`super::winograd_bf16`], and other stride-1
//! ones over multiples of 32 input channels to [`super::amx_conv`], which needs no im2col matrix at all.
//!
//! The input is copied once into a zero-padded (c_in, h + 2p, w + 2p) image (not at all without
//! padding). A tile is a run of output positions over all images of the batch, taken row segment by row
//! segment; its im2col row for input channel i and kernel tap (ky, kx) is, per segment, one slice of the
//! padded image (a `memcpy` at stride 1). The weights are used in their own (c_out, c_in·kh·kw) layout;
//! one `gemm` per tile writes a scratch tile that is copied out with the bias. Small feature maps of a
//! whole batch fit in one tile, so the low-resolution levels of the UNet still make one wide product.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

use half::bf16;

use super::sgemm::{self, PackedB, Start};
use super::tier::Tier;
use super::{amx, contiguous_f32, for_each_tile, pad_planes, row_segments, threads, SharedMut};

/// A tile's im2col matrix holds about this many floats (4 MiB), within [`MIN_TILE`, `MAX_TILE`] positions.
const COLUMN_FLOATS: usize = 1 << 20;
const MIN_TILE: usize = 96;
const MAX_TILE: usize = 2048;

/// A convolution's weights packed once for the bf16 products (see `amx`), in one of two forms: for the
/// direct product, the A operand with the depth in (tap, input channel) order (c_out rows of kh·kw runs
/// of c_in values, the layout both the tiled product and [`super::amx_conv`] read); or, for 3×3
/// stride-1 convolutions [`super::winograd_bf16`] takes, their Winograd transform. Holds the (c_out,
/// c_in, kh, kw) it came from, so the f32 weights need not be kept beside it.
#[derive(Debug)]
pub struct Bf16ConvWeights {
    form: Bf16Form,
    dims: (usize, usize, usize, usize),
}

/// How [`Bf16ConvWeights`] holds the weights.
#[derive(Debug)]
enum Bf16Form {
    /// pad(c_out, 32) rows of pad(kh·kw·c_in, 32), for the direct and tiled products.
    Direct(Vec<bf16>),
    /// U = G g Gᵀ per point, by [`super::winograd_bf16::transform_weights`].
    Winograd(Vec<bf16>),
}

impl Bf16ConvWeights {
    /// Packs f32 weights (c_out, c_in, kh, kw) for the direct (or tiled) product.
    pub fn pack(weight: &Tensor) -> Result<Self> {
        let dims = weight.dims4()?;
        let (c_out, c_in, kh, kw) = dims;
        let depth = c_in * kh * kw;
        let by_tap = weight
            .permute((0, 2, 3, 1))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut packed = Vec::new();
        amx::pack_a_rows(&mut packed, &by_tap, c_out, depth, depth);
        Ok(Bf16ConvWeights {
            form: Bf16Form::Direct(packed),
            dims,
        })
    }

    /// Transforms f32 weights (c_out, c_in, 3, 3) for [`super::winograd_bf16`]: the caller checks
    /// [`super::winograd_bf16::fits`]. Such weights serve stride-1 convolutions only.
    pub fn pack_winograd(weight: &Tensor) -> Result<Self> {
        Ok(Bf16ConvWeights {
            form: Bf16Form::Winograd(super::winograd_bf16::transform_weights(weight)?),
            dims: weight.dims4()?,
        })
    }

    /// The (c_out, c_in, kh, kw) of the weights.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        self.dims
    }

    /// The weights packed for the direct product: pad(c_out, 32) rows of pad(kh·kw·c_in, 32); an error
    /// for weights in Winograd form.
    pub fn packed(&self) -> Result<&[bf16]> {
        match &self.form {
            Bf16Form::Direct(packed) => Ok(packed),
            Bf16Form::Winograd(_) => {
                candle_core::bail!(
                    "bf16 convolution weights in Winograd form, not packed for the direct product"
                )
            }
        }
    }

    /// The weights' Winograd transform, if they were packed in that form.
    pub fn winograd(&self) -> Option<&[bf16]> {
        match &self.form {
            Bf16Form::Winograd(u) => Some(u),
            Bf16Form::Direct(_) => None,
        }
    }
}

/// The weights a convolution multiplies by: f32 (c_out, c_in, kh, kw), or packed for the bf16
/// products on AMX.
#[derive(Debug, Clone, Copy)]
pub enum ConvWeights<'a> {
    /// f32 weights, multiplied in f32.
    F32(&'a Tensor),
    /// bf16 weights, multiplied on AMX.
    Bf16(&'a Bf16ConvWeights),
}

/// Convolves `xs` (b, c_in, h, w) with `weights` (c_out, c_in, kh, kw) at `stride` with zero padding
/// `padding` on every side and adds `bias` (c_out); returns (b, c_out, ho, wo) with
/// ho = (h + 2p − kh) / stride + 1 (wo likewise). With [`ConvWeights::Bf16`] the products run in bf16
/// on AMX.
pub fn conv2d(
    xs: &Tensor,
    weights: ConvWeights<'_>,
    bias: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, c_in, h, w) = xs.dims4()?;
    let (c_out, w_in, kh, kw) = match weights {
        ConvWeights::F32(weight) => weight.dims4()?,
        ConvWeights::Bf16(packed) => packed.dims(),
    };
    if w_in != c_in
        || bias.dims() != [c_out]
        || stride == 0
        || h + 2 * padding < kh
        || w + 2 * padding < kw
    {
        candle_core::bail!(
            "conv2d: input {:?}, weight {:?}, bias {:?} with padding {padding}, stride {stride} do not fit",
            xs.dims(),
            (c_out, w_in, kh, kw),
            bias.dims()
        );
    }
    let (b, ho, wo) = (
        xs.dim(0)?,
        (h + 2 * padding - kh) / stride + 1,
        (w + 2 * padding - kw) / stride + 1,
    );
    let (xs, bias) = (xs.contiguous()?, bias.contiguous()?);
    match weights {
        ConvWeights::Bf16(packed) => {
            if !super::bf16_available() {
                candle_core::bail!(
                    "conv2d: bf16 weights, but this CPU has neither AMX nor AVX-512 BF16"
                );
            }
            if packed.winograd().is_some() && stride != 1 {
                candle_core::bail!("conv2d: weights in Winograd form at stride {stride}");
            }
            if packed.winograd().is_some() || super::amx_conv::fits(c_in, stride) {
                xs.apply_op2_no_bwd(
                    &bias,
                    &StrideOneBf16 {
                        padding,
                        weights: packed,
                    },
                )
            } else {
                xs.apply_op2_no_bwd(
                    &bias,
                    &TiledConv {
                        padding,
                        stride,
                        bf16: Some(packed),
                    },
                )
            }
        }
        ConvWeights::F32(weight) => {
            if winograd_applies((kh, kw, stride), b, (ho, wo), c_in, c_out) {
                return super::winograd::conv3x3(&xs, weight, &bias, padding);
            }
            xs.apply_op3_no_bwd(
                &weight.contiguous()?,
                &bias,
                &TiledConv {
                    padding,
                    stride,
                    bf16: None,
                },
            )
        }
    }
}

/// Whether an f32 convolution with kernel (kh, kw) at `stride` over `b` images, giving (ho, wo) maps of
/// `c_out` channels from `c_in`, runs by Winograd ([`super::winograd`]).
fn winograd_applies(
    (kh, kw, stride): (usize, usize, usize),
    b: usize,
    (ho, wo): (usize, usize),
    c_in: usize,
    c_out: usize,
) -> bool {
    (kh, kw, stride) == (3, 3, 1) && super::winograd::worthwhile(b, (ho, wo), c_in, c_out)
}

/// [`conv2d`] with f32 `weight` (c_out, c_in, 3, 3) at stride 1 over `xs` upsampled to twice its height
/// and width (nearest neighbour): where Winograd takes the upsampled size, `xs` is read in place
/// ([`super::winograd::conv3x3_upsampled`]), else it is upsampled first.
pub fn conv2d_upsampled(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
) -> Result<Tensor> {
    let (b, c_in, h, w) = xs.dims4()?;
    let (c_out, _, kh, kw) = weight.dims4()?;
    let (ho, wo) = (
        (2 * h + 2 * padding).saturating_sub(2),
        (2 * w + 2 * padding).saturating_sub(2),
    );
    if winograd_applies((kh, kw, 1), b, (ho, wo), c_in, c_out) {
        return super::winograd::conv3x3_upsampled(xs, weight, bias, padding);
    }
    conv2d(
        &xs.upsample_nearest2d(2 * h, 2 * w)?,
        ConvWeights::F32(weight),
        bias,
        padding,
        1,
    )
}

/// The custom op behind [`conv2d`] for bf16 stride-1 convolutions over (input, bias): by Winograd
/// ([`super::winograd_bf16`]) for weights in that form, else the im2col-free direct product
/// ([`super::amx_conv`]); [`conv2d`] checked that the sizes agree.
struct StrideOneBf16<'a> {
    padding: usize,
    weights: &'a Bf16ConvWeights,
}

impl CustomOp2 for StrideOneBf16<'_> {
    fn name(&self) -> &'static str {
        "pictor-conv2d-bf16-stride-1"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        b_storage: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(x_storage, x_layout, self.name())?;
        let bias = contiguous_f32(b_storage, b_layout, self.name())?;
        let dims = x_layout.shape().dims4()?;
        let (out, (ho, wo)) = if self.weights.winograd().is_some() {
            super::winograd_bf16::conv2d_winograd(xs, dims, self.weights, self.padding, bias)?
        } else {
            super::amx_conv::conv2d_direct(xs, dims, self.weights, self.padding, bias)?
        };
        let c_out = self.weights.dims().0;
        Ok((CpuStorage::F32(out), Shape::from((dims.0, c_out, ho, wo))))
    }
}

/// The custom op behind [`conv2d`] where neither Winograd nor the direct bf16 convolution applies: over
/// (input, weight, bias) with f32 weights, over (input, bias) with `bf16` weights.
struct TiledConv<'a> {
    padding: usize,
    stride: usize,
    bf16: Option<&'a Bf16ConvWeights>,
}

/// The weights of one [`TiledConv`] call.
#[derive(Clone, Copy)]
enum TiledWeights<'a> {
    /// (c_out, c_in·kh·kw) row-major.
    F32(&'a [f32]),
    /// Packed by [`Bf16ConvWeights::pack`].
    Bf16(&'a [bf16]),
}

impl CustomOp3 for TiledConv<'_> {
    fn name(&self) -> &'static str {
        "pictor-tiled-conv2d"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
        b_storage: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let weight = contiguous_f32(w_storage, w_layout, CustomOp3::name(self))?;
        self.run(
            contiguous_f32(x_storage, x_layout, CustomOp3::name(self))?,
            x_layout.shape().dims4()?,
            TiledWeights::F32(weight),
            w_layout.shape().dims4()?,
            contiguous_f32(b_storage, b_layout, CustomOp3::name(self))?,
        )
    }
}

impl CustomOp2 for TiledConv<'_> {
    fn name(&self) -> &'static str {
        "pictor-tiled-conv2d-bf16"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        b_storage: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(weights) = self.bf16 else {
            candle_core::bail!("{}: no bf16 weights", CustomOp2::name(self));
        };
        self.run(
            contiguous_f32(x_storage, x_layout, CustomOp2::name(self))?,
            x_layout.shape().dims4()?,
            TiledWeights::Bf16(weights.packed()?),
            weights.dims(),
            contiguous_f32(b_storage, b_layout, CustomOp2::name(self))?,
        )
    }
}

impl TiledConv<'_> {
    /// The convolution of `xs` (`x_dims`) by `weights` (`w_dims`), plus `bias`.
    fn run(
        &self,
        xs: &[f32],
        (batch, c_in, h, w): (usize, usize, usize, usize),
        weights: TiledWeights<'_>,
        (c_out, _, kh, kw): (usize, usize, usize, usize),
        bias: &[f32],
    ) -> Result<(CpuStorage, Shape)> {
        let taps = kh * kw;
        let depth = c_in * taps;
        let (p, s) = (self.padding, self.stride);
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        let (ho, wo) = ((hp - kh) / s + 1, (wp - kw) / s + 1);
        let plane = hp * wp;
        let padded_storage;
        let padded: &[f32] = if p == 0 {
            xs
        } else {
            padded_storage = pad_planes(xs, (h, w), (hp, wp), p, 0);
            &padded_storage
        };

        // Output positions (b, y, x) numbered b·ho·wo + y·wo + x.
        let per_image = ho * wo;
        let total = batch * per_image;
        // Enough tiles for every thread to take two, where the tiles stay wide enough to pay.
        let tile = (COLUMN_FLOATS / depth)
            .min(total.div_ceil(2 * threads()))
            .clamp(MIN_TILE, MAX_TILE)
            .min(total);
        // Too few tiles to run side by side: one tile of every position instead, so the product packs
        // the weights once rather than once per tile (10–25 % faster on the UNet's 8² maps, measured).
        let tile = if total.div_ceil(tile) < 2 * threads() {
            total
        } else {
            tile
        };
        let tiles = total.div_ceil(tile);
        let mut out = vec![0f32; batch * c_out * per_image];
        let dst = SharedMut(out.as_mut_ptr());
        // Below AVX-512 the f32 product is our tiered sgemm, so that `PICTOR_CPU` governs every f32
        // product (the `gemm` crate picks its kernels by the CPU alone).
        let own_product = Tier::active() < Tier::Avx512;
        let run = |buffers: &mut (Vec<f32>, Vec<f32>, Vec<bf16>, PackedB),
                   index: usize,
                   parallelism: Parallelism| {
            let (columns, scratch, packed_columns, packed_f32) = buffers;
            let start = index * tile;
            let len = tile.min(total - start);
            let segments = row_segments(start, len, (ho, wo));
            columns.resize(depth * len, 0.0);
            for i in 0..c_in {
                for t in 0..taps {
                    let (ky, kx) = (t / kw, t % kw);
                    // The depth in the weights' order: (input channel, tap) for the f32 product,
                    // (tap, input channel) for the packed bf16 weights.
                    let column = match weights {
                        TiledWeights::Bf16(_) => t * c_in + i,
                        TiledWeights::F32(_) => i * taps + t,
                    };
                    let row = &mut columns[column * len..][..len];
                    for seg in &segments {
                        let src = (seg.image * c_in + i) * plane
                            + (seg.row * s + ky) * wp
                            + seg.col * s
                            + kx;
                        let dst = &mut row[seg.offset..seg.offset + seg.count];
                        if s == 1 {
                            dst.copy_from_slice(&padded[src..src + seg.count]);
                        } else {
                            for (j, d) in dst.iter_mut().enumerate() {
                                *d = padded[src + j * s];
                            }
                        }
                    }
                }
            }
            let ldc = match weights {
                TiledWeights::Bf16(packed) => {
                    let (mp, np, kp) = (
                        amx::pad(c_out, amx::BLOCK),
                        amx::pad(len, amx::BLOCK),
                        amx::pad(depth, amx::DEPTH),
                    );
                    amx::pack_b_rows(packed_columns, columns, depth, len, len);
                    scratch.resize(mp * np, 0.0);
                    let parallel = matches!(parallelism, Parallelism::Rayon(_));
                    // SAFETY: bf16 products are available (checked by `conv2d`); packed is mp × kp, b
                    // kp × np.
                    unsafe {
                        super::bf16_matmul(
                            mp,
                            np,
                            kp,
                            packed,
                            packed_columns,
                            scratch.as_mut_ptr(),
                            np,
                            parallel,
                        )
                    };
                    np
                }
                TiledWeights::F32(weight) if own_product => {
                    scratch.resize(c_out * len, 0.0);
                    packed_f32.repack_rows(columns, depth, len, len);
                    let parallel = matches!(parallelism, Parallelism::Rayon(_));
                    sgemm::gemm_maybe_parallel(
                        parallel,
                        c_out,
                        weight,
                        depth,
                        packed_f32,
                        scratch,
                        len,
                        Start::Zero,
                    );
                    len
                }
                TiledWeights::F32(weight) => {
                    scratch.resize(c_out * len, 0.0);
                    // SAFETY: scratch is (c_out × len), weight (c_out × depth), columns (depth × len),
                    // all row-major and in bounds.
                    unsafe {
                        gemm::gemm(
                            c_out,
                            len,
                            depth,
                            scratch.as_mut_ptr(),
                            1,
                            len as isize,
                            false,
                            weight.as_ptr(),
                            1,
                            depth as isize,
                            columns.as_ptr(),
                            1,
                            len as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            parallelism,
                        );
                    }
                    len
                }
            };
            for seg in &segments {
                for (o, &bias) in bias.iter().enumerate() {
                    let src = &scratch[o * ldc + seg.offset..][..seg.count];
                    let offset = ((seg.image * c_out + o) * ho + seg.row) * wo + seg.col;
                    // SAFETY: these output positions belong to this tile only.
                    let out = unsafe { std::slice::from_raw_parts_mut(dst.at(offset), seg.count) };
                    for (d, &v) in out.iter_mut().zip(src) {
                        *d = v + bias;
                    }
                }
            }
        };
        for_each_tile(tiles, run);
        Ok((CpuStorage::F32(out), Shape::from((batch, c_out, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_candle_conv2d_on_awkward_shapes_at_every_tier() -> Result<()> {
        super::super::at_every_tier(equals_candle_conv2d_on_awkward_shapes)
    }

    fn equals_candle_conv2d_on_awkward_shapes() -> Result<()> {
        let device = Device::Cpu;
        // (batch, c_in, c_out, h, w, kernel, padding, stride): odd channels, non-square and one-pixel
        // images, 1×1 and 3×3 kernels with and without padding, stride 1 and 2 (even and odd sizes),
        // batch 1 and 8, enough positions for many tiles, tiles that span images, a 1×1 product over
        // several panels of positions with a partial last one.
        for &(b, c_in, c_out, h, w, k, p, s) in &[
            (1, 3, 5, 7, 9, 3, 1, 1),
            (8, 4, 6, 5, 3, 3, 1, 1),
            (1, 7, 3, 1, 1, 3, 1, 1),
            (2, 5, 9, 6, 11, 1, 0, 1),
            (1, 6, 4, 8, 5, 3, 0, 1),
            (8, 3, 3, 4, 4, 1, 0, 1),
            (2, 40, 70, 16, 13, 1, 0, 1),
            (1, 13, 17, 70, 45, 3, 1, 1),
            (2, 32, 1100, 9, 7, 3, 1, 1),
            (1, 5, 7, 9, 12, 3, 1, 2),
            (8, 3, 4, 10, 7, 3, 0, 2),
            (2, 9, 11, 33, 17, 3, 1, 2),
        ] {
            let xs = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &device)?;
            let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, k, k), &device)?;
            let bias = Tensor::randn(0f32, 1.0, c_out, &device)?;
            let plain = xs
                .conv2d(&weight, p, s, 1, 1)?
                .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
            // Both the dispatching entry point (Winograd for the larger 3×3 cases) and the tiled
            // product itself.
            let tiled = xs.apply_op3_no_bwd(
                &weight,
                &bias,
                &TiledConv {
                    padding: p,
                    stride: s,
                    bf16: None,
                },
            )?;
            for fast in [conv2d(&xs, ConvWeights::F32(&weight), &bias, p, s)?, tiled] {
                assert_eq!(fast.dims(), plain.dims());
                let diff = super::super::max_abs_diff(&fast, &plain)?;
                assert!(
                    diff < 1e-4,
                    "{b}x{c_in}x{h}x{w} → {c_out}, {k}×{k} pad {p} stride {s}: {diff}"
                );
            }
        }
        let xs = Tensor::zeros((1, 2, 3, 3), candle_core::DType::F32, &device)?;
        let weight = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &device)?;
        let bias = Tensor::zeros(4, candle_core::DType::F32, &device)?;
        assert!(conv2d(&xs, ConvWeights::F32(&weight), &bias, 1, 1).is_err());
        Ok(())
    }

    #[test]
    fn bf16_conv_is_close_to_candle_conv2d() -> Result<()> {
        if !super::super::bf16_available() {
            eprintln!("no bf16 products on this machine: skipped");
            return Ok(());
        }
        let device = Device::Cpu;
        for &(b, c_in, c_out, h, w, k, p, s) in &[
            (1, 3, 5, 7, 9, 3, 1, 1),
            (8, 4, 6, 5, 3, 3, 1, 1),
            (2, 32, 70, 33, 17, 3, 1, 1),
            (1, 40, 33, 9, 12, 1, 0, 1),
            (2, 9, 11, 33, 17, 3, 1, 2),
        ] {
            let xs = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &device)?;
            let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, k, k), &device)?;
            let bias = Tensor::randn(0f32, 1.0, c_out, &device)?;
            let packed = Bf16ConvWeights::pack(&weight)?;
            let fast = conv2d(&xs, ConvWeights::Bf16(&packed), &bias, p, s)?;
            let plain = xs
                .conv2d(&weight, p, s, 1, 1)?
                .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
            let scale = plain.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let diff = super::super::max_abs_diff(&fast, &plain)?;
            assert!(
                diff < 0.02 * scale,
                "{b}x{c_in}x{h}x{w} → {c_out}: {diff} of {scale}"
            );
        }
        Ok(())
    }

    #[test]
    fn direct_bf16_conv_equals_the_tiled_bf16_product_and_candle() -> Result<()> {
        if !super::super::bf16_available() {
            eprintln!("no bf16 products on this machine: skipped");
            return Ok(());
        }
        let device = Device::Cpu;
        // (batch, c_in, c_out, h, w, kernel, padding): channel counts the direct kernel takes (multiples
        // of 32) with odd output channels, non-square maps narrower and wider than a block of 32
        // positions, one-pixel and one-row images, 1×1 and 3×3 kernels with and without padding, a
        // 3×3 kernel over a map it just covers, batch 1 and 8; weights small enough to be taken
        // position block by position block, and one set too large for that.
        for &(b, c_in, c_out, h, w, k, p) in &[
            (1, 32, 5, 7, 9, 3, 1),
            (8, 64, 33, 5, 3, 3, 1),
            (2, 32, 70, 33, 17, 3, 1),
            (1, 96, 16, 1, 1, 3, 1),
            (2, 64, 47, 1, 40, 3, 1),
            (2, 32, 9, 9, 12, 1, 0),
            (1, 64, 31, 6, 7, 3, 0),
            (1, 32, 3, 3, 3, 3, 0),
            (2, 320, 64, 8, 8, 3, 1),
            (1, 32, 32, 64, 64, 3, 1),
            // Weights over 1 MiB in bf16, taken block of channels by block of channels.
            (2, 640, 97, 5, 6, 3, 1),
        ] {
            assert!(super::super::amx_conv::fits(c_in, 1));
            let xs = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &device)?;
            let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, k, k), &device)?;
            let bias = Tensor::randn(0f32, 1.0, c_out, &device)?;
            let packed = Bf16ConvWeights::pack(&weight)?;
            let direct = conv2d(&xs, ConvWeights::Bf16(&packed), &bias, p, 1)?;
            let tiled = xs.apply_op2_no_bwd(
                &bias,
                &TiledConv {
                    padding: p,
                    stride: 1,
                    bf16: Some(&packed),
                },
            )?;
            let plain = xs
                .conv2d(&weight, p, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
            assert_eq!(direct.dims(), plain.dims());
            let scale = plain.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            // The same bf16 inputs and weights, summed in f32 in another order: near equal.
            let same = super::super::max_abs_diff(&direct, &tiled)?;
            assert!(
                same < 1e-4 * scale,
                "{b}x{c_in}x{h}x{w} → {c_out}, {k}×{k} pad {p}: {same} from the tiled product"
            );
            let diff = super::super::max_abs_diff(&direct, &plain)?;
            assert!(
                diff < 0.02 * scale,
                "{b}x{c_in}x{h}x{w} → {c_out}, {k}×{k} pad {p}: {diff} of {scale}"
            );
        }
        Ok(())
    }
}
