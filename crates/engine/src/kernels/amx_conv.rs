//! Stride-1 convolutions in bf16 on AMX (or AVX-512 BF16, [`dot_bf16::conv_block`]) with no im2col
//! matrix, for input channels in multiples of 32 (every convolution of SD's UNet and VAE but the
//! first): each kernel tap is a product of the weights with the input shifted by that tap, and the
//! tile loads (or vector loads) read the shifted input straight out of one bf16 copy of it.
//!
//! The input is copied once into zero-padded planes of channel pairs, (batch, c_in / 2, h + 2p, w + 2p,
//! 2) in bf16, so that 16 positions of one pair of channels are 64 contiguous bytes: one row of an AMX B
//! tile, whose 16 rows are 16 pairs of channels a plane apart. Output positions are numbered along the
//! padded width (q = y · (w + 2p) + x), so a run of 32 of them reads one contiguous run of the input at
//! every tap, shifted by ky · (w + 2p) + kx; the positions past the output's width that this computes
//! on the way are dropped when a block is copied out. Each 32 × 32 block of (output channels ×
//! positions) accumulates in the tiles over every tap and channel block, then goes out with its bias.
//!
//! Against the tiled product of [`super::conv`] (an f32 im2col matrix of the tile, nine times the input,
//! then packed to bf16 per call) this reads the input once per tap from cache and writes nothing but
//! the output.

use candle_core::Result;
use half::bf16;
use rayon::prelude::*;

use super::amx::{self, BLOCK, DEPTH};
use super::conv::Bf16ConvWeights;
use super::{dot_bf16, row_segments, threads, vector, SharedMut};

/// Whether [`conv2d_direct`] takes a convolution of `c_in` input channels at `stride`.
pub fn fits(c_in: usize, stride: usize) -> bool {
    stride == 1 && c_in > 0 && c_in.is_multiple_of(DEPTH)
}

/// The stride-1 convolution of `xs` (`dims` = batch, c_in, h, w) with zero padding `padding` by weights
/// packed for the direct product, plus `bias` (c_out): the output (batch, c_out, ho, wo) and (ho, wo).
/// Errors if [`fits`] does not hold or the CPU has no bf16 products; the caller (`conv::conv2d`, the
/// only one) checked that the sizes agree.
pub(super) fn conv2d_direct(
    xs: &[f32],
    (batch, c_in, h, w): (usize, usize, usize, usize),
    weights: &Bf16ConvWeights,
    padding: usize,
    bias: &[f32],
) -> Result<(Vec<f32>, (usize, usize))> {
    let (c_out, _, kh, kw) = weights.dims();
    if !super::bf16_available() || !fits(c_in, 1) {
        candle_core::bail!(
            "direct bf16 convolution: {c_in} input channels (a multiple of 32 is needed), bf16 \
             products available: {}",
            super::bf16_available()
        );
    }
    let shape = Shape4 {
        batch,
        c_in,
        h,
        w,
        c_out,
        kh,
        kw,
        p: padding,
    };
    let out = convolve(xs, &shape, weights.packed()?, bias);
    Ok((out, shape.output()))
}

/// The sizes of one convolution.
struct Shape4 {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    /// Zero padding on every side.
    p: usize,
}

impl Shape4 {
    /// The padded input's height and width.
    fn padded(&self) -> (usize, usize) {
        (self.h + 2 * self.p, self.w + 2 * self.p)
    }

    /// The output's height and width.
    fn output(&self) -> (usize, usize) {
        let (hp, wp) = self.padded();
        (hp - self.kh + 1, wp - self.kw + 1)
    }
}

/// Copies `xs` (batch, c_in, h, w) into zero-padded bf16 planes of channel pairs, (batch, c_in / 2,
/// hp, wp, 2), followed by enough zeros that a block of positions at the end of the last plane can read
/// past it at every tap.
fn channel_pairs(xs: &[f32], s: &Shape4) -> Vec<bf16> {
    let (hp, wp) = s.padded();
    let (plane, pairs, p) = (hp * wp, s.c_in / 2, s.p);
    let body = s.batch * pairs * plane * 2;
    let len = body + 2 * (BLOCK + s.kw);
    let mut buffer: Vec<bf16> = Vec::with_capacity(len);
    let spare = &mut buffer.spare_capacity_mut()[..len];
    // SAFETY: MaybeUninit<bf16> has bf16's layout; the slice is only written before `set_len`.
    let all = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<bf16>(), len) };
    let (planes, tail) = all.split_at_mut(body);
    tail.fill(bf16::ZERO);
    let area = s.h * s.w;
    planes
        .par_chunks_mut(plane * 2)
        .enumerate()
        .for_each(|(index, dst)| {
            let (image, pair) = (index / pairs, index % pairs);
            let first = &xs[(image * s.c_in + 2 * pair) * area..][..area];
            let second = &xs[(image * s.c_in + 2 * pair + 1) * area..][..area];
            for (y, row) in dst.chunks_exact_mut(wp * 2).enumerate() {
                if y < p || y >= p + s.h {
                    row.fill(bf16::ZERO);
                    continue;
                }
                let (left, rest) = row.split_at_mut(2 * p);
                let (values, right) = rest.split_at_mut(2 * s.w);
                left.fill(bf16::ZERO);
                right.fill(bf16::ZERO);
                let from = (y - p) * s.w;
                vector::bf16_pairs(&first[from..][..s.w], &second[from..][..s.w], values);
            }
        });
    // SAFETY: all `len` elements were written above.
    unsafe { buffer.set_len(len) };
    buffer
}

/// Packed weights up to this many bytes are read from L2 by every block of positions (half of L2 on
/// the Xeons with AMX, 2 MiB per core).
const SMALL_WEIGHTS: usize = 1 << 20;

/// One 32 × 32 f32 block of C, aligned for the tile store.
#[repr(C, align(64))]
struct Block([f32; BLOCK * BLOCK]);

/// The convolution: (batch, c_out, ho, wo) from `xs` (batch, c_in, h, w).
fn convolve(xs: &[f32], s: &Shape4, packed: &[bf16], bias: &[f32]) -> Vec<f32> {
    let input = channel_pairs(xs, s);
    let (hp, wp) = s.padded();
    let (ho, wo) = s.output();
    let (plane, pairs, taps) = (hp * wp, s.c_in / 2, s.kh * s.kw);
    let depth = taps * s.c_in;
    // Positions of one image along the padded width, in blocks of 32.
    let span = ho * wp;
    let per_image = span.div_ceil(BLOCK);
    let position_blocks = s.batch * per_image;
    let channel_blocks = amx::pad(s.c_out, BLOCK) / BLOCK;
    let mut out = vec![0f32; s.batch * s.c_out * ho * wo];
    let dst = SharedMut(out.as_mut_ptr());
    // AMX tiles where the CPU has them, else AVX-512 BF16 (the caller checked one of the two).
    let use_amx = amx::available();
    let geometry = dot_bf16::ConvGeometry {
        taps,
        kw: s.kw,
        wp,
        c_in: s.c_in,
        plane: plane * 2,
    };
    // One 32 × 32 block of the output: channels cb·32.., positions pb·32.. of one image.
    let compute = |cb: usize, pb: usize, block: &mut Block| {
        let a0 = packed[cb * BLOCK * depth..].as_ptr();
        let (image, q0) = (pb / per_image, pb % per_image * BLOCK);
        let base = input[(image * pairs * plane + q0) * 2..].as_ptr();
        // SAFETY: with AMX, the caller configured the tiles; without, AVX-512 BF16 is available. Every
        // A tile (or row of A) lies in this block's 32 rows of weights (the packed weights have
        // pad(c_out, 32) rows of `depth`), and every B tile (or vector) in `input`: its 16 pairs of
        // channels are planes of this image, and its 32 positions at the largest shift end at most
        // BLOCK + kw positions past the last plane, which `channel_pairs` padded with zeros. The
        // block is 32 × 32 floats.
        unsafe {
            if use_amx {
                let a1 = a0.add(16 * depth);
                amx::zero_block();
                for t in 0..taps {
                    let shift = (t / s.kw) * wp + t % s.kw;
                    for kb in 0..s.c_in / DEPTH {
                        let column = t * s.c_in + kb * DEPTH;
                        let b0 = base.add((kb * 16 * plane + shift) * 2);
                        amx::accumulate_block(
                            [a0.add(column), a1.add(column)],
                            depth * 2,
                            [b0, b0.add(32)],
                            plane * 4,
                        );
                    }
                }
                amx::store_block(block.0.as_mut_ptr(), BLOCK);
            } else {
                dot_bf16::conv_block(a0, depth, base, &geometry, block.0.as_mut_ptr());
            }
        }
        // Copy the positions that exist (x < wo; q < span) out, row piece by row piece.
        let channels = (s.c_out - cb * BLOCK).min(BLOCK);
        for piece in row_segments(q0, BLOCK.min(span - q0), (ho, wp)) {
            if piece.col >= wo {
                continue;
            }
            let count = piece.count.min(wo - piece.col);
            for o in 0..channels {
                let channel = cb * BLOCK + o;
                let src = &block.0[o * BLOCK + piece.offset..][..count];
                let at = ((image * s.c_out + channel) * ho + piece.row) * wo + piece.col;
                // SAFETY: these output positions of this channel belong to this block only.
                let out = unsafe { std::slice::from_raw_parts_mut(dst.at(at), count) };
                for (d, &v) in out.iter_mut().zip(src) {
                    *d = v + bias[channel];
                }
            }
        }
    };
    // Small weights (1×1 and narrow convolutions) all stay in L2: a task is a run of position blocks,
    // each read once and multiplied by every block of channels while it is in cache. Large weights:
    // a task is one block of channels (its weights stay in L2) over a run of position blocks. Either
    // way, about four tasks per thread.
    let group = if packed.len() * 2 <= SMALL_WEIGHTS {
        channel_blocks
    } else {
        1
    };
    let groups = channel_blocks / group;
    let runs = (4 * threads()).div_ceil(groups).clamp(1, position_blocks);
    let per_run = position_blocks.div_ceil(runs);
    let runs = position_blocks.div_ceil(per_run);
    (0..groups * runs).into_par_iter().for_each(|task| {
        let (run, g) = (task / groups, task % groups);
        let mut block = Block([0f32; BLOCK * BLOCK]);
        // SAFETY: AMX is available when used.
        let _tiles = use_amx.then(|| unsafe { amx::Tiles::configure() });
        for pb in run * per_run..((run + 1) * per_run).min(position_blocks) {
            for cb in g * group..(g + 1) * group {
                compute(cb, pb, &mut block);
            }
        }
    });
    out
}
