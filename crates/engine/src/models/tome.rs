//! Token merging for Stable Diffusion (ToMe, as the `tomesd` package applies it): before an operation of a
//! transformer block, the most similar tokens are averaged together so the operation sees fewer of them;
//! after it, every merged token gets its group's result back ("unmerge").
//!
//! The matching is tomesd's bipartite soft matching: the h × w token grid is cut into sy × sx cells, one
//! token per cell is a destination, the others are sources; each source finds its most similar destination
//! (cosine similarity), and the `r` sources with the best matches are averaged into their destinations.
//!
//! Which token of a cell is the destination is drawn at random by tomesd (`use_rand`, its default) from a
//! generator forked from torch's global one. Pictor draws it from its own [`TorchGenerator`] seeded with the
//! request seed, so a request with a seed always gives the same image, and the draws are exactly those of
//! tomesd run after `torch.manual_seed(seed)` (one `torch.randint(sy·sx)` per cell per merged block, in
//! execution order). Like tomesd, an odd batch (no classifier-free guidance pairing) uses the top-left
//! token of every cell instead.

use candle_core::{DType, Device, Result, Tensor, D};

use crate::rng::TorchGenerator;

/// How tokens are merged: tomesd's `apply_patch` arguments, with its defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TomeSettings {
    /// Share of a block's tokens removed by merging (0.5 halves them); at most 1 − 1/(sx·sy).
    pub ratio: f64,
    /// Merge only in blocks whose feature map is downsampled at most this much (1 = full latent size only).
    pub max_downsample: usize,
    /// Width of the cells that each hold one destination token.
    pub sx: usize,
    /// Height of those cells.
    pub sy: usize,
    /// Draw the destination token of each cell at random (seeded) instead of taking its top-left one.
    pub use_rand: bool,
    /// Merge around the self-attention.
    pub merge_attn: bool,
    /// Merge around the cross-attention.
    pub merge_crossattn: bool,
    /// Merge around the feed-forward.
    pub merge_mlp: bool,
}

impl Default for TomeSettings {
    /// tomesd's defaults: ratio 0.5, full-resolution blocks only, 2 × 2 cells, random destinations,
    /// self-attention only.
    fn default() -> Self {
        TomeSettings {
            ratio: 0.5,
            max_downsample: 1,
            sx: 2,
            sy: 2,
            use_rand: true,
            merge_attn: true,
            merge_crossattn: false,
            merge_mlp: false,
        }
    }
}

impl TomeSettings {
    /// Checks the values, saying what is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.sx == 0 || self.sy == 0 {
            return Err("sx and sy must be at least 1".into());
        }
        let max = 1.0 - 1.0 / (self.sx * self.sy) as f64;
        if !(0.0..=max).contains(&self.ratio) {
            return Err(format!(
                "ratio must be between 0 and {max} for {}×{} cells, got {}",
                self.sx, self.sy, self.ratio
            ));
        }
        if self.max_downsample == 0 {
            return Err("max_downsample must be at least 1".into());
        }
        Ok(())
    }
}

/// The operations of a transformer block that merging can wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStage {
    /// attn1.
    SelfAttention,
    /// attn2.
    CrossAttention,
    /// The feed-forward.
    FeedForward,
}

/// Token merging over one generation: the settings, the generator of destination choices, and the latent
/// size of the current UNet call.
#[derive(Clone)]
pub struct TokenMerging {
    settings: TomeSettings,
    rng: TorchGenerator,
    latent_size: (usize, usize),
}

impl std::fmt::Debug for TokenMerging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMerging")
            .field("settings", &self.settings)
            .field("seed", &self.rng.seed())
            .finish()
    }
}

impl TokenMerging {
    /// Merging with `settings` for a generation with `seed` (the seed of the destination choices).
    pub fn new(settings: TomeSettings, seed: u64) -> Self {
        TokenMerging {
            settings,
            rng: TorchGenerator::new(seed),
            latent_size: (0, 0),
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> &TomeSettings {
        &self.settings
    }

    /// Records the latent height and width of the UNet call about to run (tomesd's forward pre-hook).
    pub fn set_latent_size(&mut self, height: usize, width: usize) {
        self.latent_size = (height, width);
    }

    /// The merge for a block whose tokens `xs` (b, h·w, c) lay on an h × w grid, or `None` when the block is
    /// too downsampled or nothing would merge. Draws the destination choices when they are random.
    pub fn plan(&mut self, xs: &Tensor, (h, w): (usize, usize)) -> Result<Option<BlockMerge>> {
        let s = self.settings;
        let (batch, n, _) = xs.dims3()?;
        let (lh, lw) = self.latent_size;
        if n == 0 || n != h * w {
            return Ok(None);
        }
        // tomesd: ceil(sqrt(original tokens // tokens)).
        let downsample = (((lh * lw) / n) as f64).sqrt().ceil() as usize;
        if downsample > s.max_downsample {
            return Ok(None);
        }
        let r = (n as f64 * s.ratio) as usize;
        if r == 0 {
            return Ok(None);
        }
        let cells = (h / s.sy) * (w / s.sx);
        let cell_size = (s.sx * s.sy) as u32;
        let choice: Vec<usize> = if s.use_rand && batch.is_multiple_of(2) {
            (0..cells)
                .map(|_| (self.rng.random_u32() % cell_size) as usize)
                .collect()
        } else {
            vec![0; cells]
        };
        let plan = bipartite_soft_matching(xs, (h, w), (s.sy, s.sx), r, &choice)?;
        Ok(plan.map(|plan| BlockMerge { plan, settings: s }))
    }
}

/// One block's merge and which of its operations it wraps.
#[derive(Debug)]
pub struct BlockMerge {
    plan: MergePlan,
    settings: TomeSettings,
}

impl BlockMerge {
    /// Whether `stage` runs on merged tokens.
    pub fn applies(&self, stage: BlockStage) -> bool {
        match stage {
            BlockStage::SelfAttention => self.settings.merge_attn,
            BlockStage::CrossAttention => self.settings.merge_crossattn,
            BlockStage::FeedForward => self.settings.merge_mlp,
        }
    }

    /// The matching itself.
    pub fn plan(&self) -> &MergePlan {
        &self.plan
    }
}

/// A matching of tokens, ready to merge tensors of (b, n, c) to (b, n − r, c) and to unmerge them back.
///
/// The merged sequence holds, per batch item, the unmerged sources (best-matched last) followed by the
/// destinations, each the mean of itself and the sources merged into it.
#[derive(Debug)]
pub struct MergePlan {
    batch: usize,
    tokens: usize,
    removed: usize,
    unmerged: usize,
    destinations: usize,
    /// Rows of the flattened (b·n) input that stay as they are.
    unmerged_rows: Tensor,
    /// Rows of the flattened input that are merged away.
    source_rows: Tensor,
    /// Rows of the flattened input that are destinations.
    destination_rows: Tensor,
    /// For every merged-away source, its destination's row among the flattened (b·destinations).
    source_targets: Tensor,
    /// How many tokens each destination averages (itself included), (b·destinations, 1), float32.
    group_sizes: Tensor,
    /// For every row of the flattened output, the row of the flattened merged sequence it copies.
    unmerge_rows: Tensor,
}

fn row_tensor(rows: Vec<u32>, device: &Device) -> Result<Tensor> {
    let n = rows.len();
    Tensor::from_vec(rows, n, device)
}

/// tomesd's `bipartite_soft_matching_random2d`: matches the tokens of `metric` (b, h·w, c) on an h × w grid
/// with one destination per sy × sx cell (`choice[cell]` = its index inside the cell, row-major; cells
/// row-major over the ⌊h/sy⌋ × ⌊w/sx⌋ cells that fit; tokens outside them are sources) and merges the `r`
/// sources most similar to a destination (fewer if there are not that many sources). `None` when nothing
/// can merge.
pub fn bipartite_soft_matching(
    metric: &Tensor,
    (h, w): (usize, usize),
    (sy, sx): (usize, usize),
    r: usize,
    choice: &[usize],
) -> Result<Option<MergePlan>> {
    let (batch, n, c) = metric.dims3()?;
    if n != h * w {
        candle_core::bail!("tome: {n} tokens do not form a {h}×{w} grid");
    }
    let (hsy, wsx) = (h / sy, w / sx);
    if choice.len() != hsy * wsx || choice.iter().any(|&k| k >= sx * sy) {
        candle_core::bail!("tome: destination choice does not fit the {hsy}×{wsx} cells");
    }
    let mut is_destination = vec![false; n];
    for (cell, &k) in choice.iter().enumerate() {
        let (i, j) = (cell / wsx, cell % wsx);
        is_destination[(i * sy + k / sx) * w + j * sx + k % sx] = true;
    }
    let sources: Vec<usize> = (0..n).filter(|&t| !is_destination[t]).collect();
    let dests: Vec<usize> = (0..n).filter(|&t| is_destination[t]).collect();
    let (na, nd) = (sources.len(), dests.len());
    let r = r.min(na);
    if r == 0 || nd == 0 {
        return Ok(None);
    }
    let device = metric.device();
    let rows_of = |tokens: &[usize]| -> Vec<u32> {
        (0..batch)
            .flat_map(|b| tokens.iter().map(move |&t| (b * n + t) as u32))
            .collect()
    };
    let source_rows_all = row_tensor(rows_of(&sources), device)?;
    let destination_rows = row_tensor(rows_of(&dests), device)?;

    // Cosine similarity of every source to every destination, in float32.
    let flat = metric.to_dtype(DType::F32)?.reshape((batch * n, c))?;
    let unit = |rows: &Tensor, len: usize| -> Result<Tensor> {
        let x = flat.index_select(rows, 0)?.reshape((batch, len, c))?;
        x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
    };
    let a = unit(&source_rows_all, na)?;
    let b = unit(&destination_rows, nd)?;
    // Left operand contiguous (candle 0.11 mis-reads a transposed left operand when batch > 1).
    let scores = a.contiguous()?.matmul(&b.t()?)?;
    let best = scores.max(D::Minus1)?;
    let best_dest: Vec<Vec<u32>> = scores.argmax(D::Minus1)?.to_vec2()?;
    // Sources by decreasing best similarity (stable: ties keep token order).
    let order: Vec<Vec<u32>> = best.arg_sort_last_dim(false)?.to_vec2()?;

    let unmerged = na - r;
    let merged_len = n - r;
    let mut unmerged_rows = Vec::with_capacity(batch * unmerged);
    let mut source_rows = Vec::with_capacity(batch * r);
    let mut source_targets = Vec::with_capacity(batch * r);
    let mut group_sizes = vec![1f32; batch * nd];
    let mut unmerge_rows = vec![0u32; batch * n];
    for bi in 0..batch {
        let base = bi * merged_len;
        for (k, &s) in order[bi][r..].iter().enumerate() {
            let token = sources[s as usize];
            unmerged_rows.push((bi * n + token) as u32);
            unmerge_rows[bi * n + token] = (base + k) as u32;
        }
        for (j, &token) in dests.iter().enumerate() {
            unmerge_rows[bi * n + token] = (base + unmerged + j) as u32;
        }
        for &s in &order[bi][..r] {
            let token = sources[s as usize];
            let d = best_dest[bi][s as usize] as usize;
            source_rows.push((bi * n + token) as u32);
            source_targets.push((bi * nd + d) as u32);
            group_sizes[bi * nd + d] += 1.0;
            unmerge_rows[bi * n + token] = (base + unmerged + d) as u32;
        }
    }
    Ok(Some(MergePlan {
        batch,
        tokens: n,
        removed: r,
        unmerged,
        destinations: nd,
        unmerged_rows: row_tensor(unmerged_rows, device)?,
        source_rows: row_tensor(source_rows, device)?,
        destination_rows,
        source_targets: row_tensor(source_targets, device)?,
        group_sizes: Tensor::from_vec(group_sizes, (batch * nd, 1), device)?,
        unmerge_rows: row_tensor(unmerge_rows, device)?,
    }))
}

impl MergePlan {
    /// Tokens per batch item before merging.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Tokens per batch item after merging.
    pub fn merged_tokens(&self) -> usize {
        self.tokens - self.removed
    }

    /// Merges `xs` (b, n, c): sources into the mean of their destination groups.
    pub fn merge(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, n, c) = xs.dims3()?;
        if batch != self.batch || n != self.tokens {
            candle_core::bail!(
                "tome: merge of {batch}×{n} tokens with a plan for {}×{}",
                self.batch,
                self.tokens
            );
        }
        let flat = xs.reshape((batch * n, c))?;
        let dests = flat
            .index_select(&self.destination_rows, 0)?
            .index_add(
                &self.source_targets,
                &flat.index_select(&self.source_rows, 0)?,
                0,
            )?
            .broadcast_div(&self.group_sizes.to_dtype(xs.dtype())?)?
            .reshape((batch, self.destinations, c))?;
        if self.unmerged == 0 {
            return Ok(dests);
        }
        let kept = flat
            .index_select(&self.unmerged_rows, 0)?
            .reshape((batch, self.unmerged, c))?;
        Tensor::cat(&[&kept, &dests], 1)
    }

    /// Spreads merged tokens (b, n − r, c) back over the n positions: every merged-away source takes its
    /// destination's value.
    pub fn unmerge(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, m, c) = xs.dims3()?;
        if batch != self.batch || m != self.merged_tokens() {
            candle_core::bail!(
                "tome: unmerge of {batch}×{m} tokens with a plan for {}×{}",
                self.batch,
                self.merged_tokens()
            );
        }
        xs.reshape((batch * m, c))?
            .index_select(&self.unmerge_rows, 0)?
            .reshape((batch, self.tokens, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_tokens(batch: usize, n: usize, c: usize, seed: u64) -> Tensor {
        TorchGenerator::new(seed)
            .randn_tensor((batch, n, c), DType::F32, &Device::Cpu)
            .unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn identical_tokens_merge_and_unmerge_to_themselves() {
        let token = random_tokens(1, 1, 8, 1);
        let xs = token
            .broadcast_as((2, 64, 8))
            .unwrap()
            .contiguous()
            .unwrap();
        let plan = bipartite_soft_matching(&xs, (8, 8), (2, 2), 32, &[0; 16])
            .unwrap()
            .unwrap();
        let merged = plan.merge(&xs).unwrap();
        assert_eq!(merged.dims(), &[2, 32, 8]);
        assert!(max_abs(&plan.unmerge(&merged).unwrap(), &xs) < 1e-6);
    }

    #[test]
    fn exact_duplicates_of_destinations_are_the_ones_merged() {
        // 4×4 grid, top-left destinations at tokens 0, 2, 8, 10; four sources copy one destination each.
        let xs = random_tokens(1, 16, 6, 2);
        let copies = [(5, 0), (3, 2), (12, 8), (15, 10)];
        let mut rows: Vec<Tensor> = (0..16).map(|t| xs.narrow(1, t, 1).unwrap()).collect();
        for (to, from) in copies {
            rows[to] = rows[from].clone();
        }
        let xs = Tensor::cat(&rows, 1).unwrap();
        let plan = bipartite_soft_matching(&xs, (4, 4), (2, 2), 4, &[0; 4])
            .unwrap()
            .unwrap();
        let merged = plan.merge(&xs).unwrap();
        assert_eq!(plan.merged_tokens(), 12);
        // Merging a token into its exact copy loses nothing.
        assert!(max_abs(&plan.unmerge(&merged).unwrap(), &xs) < 1e-6);
        // One more merge must average two different tokens.
        let plan = bipartite_soft_matching(&xs, (4, 4), (2, 2), 5, &[0; 4])
            .unwrap()
            .unwrap();
        assert!(max_abs(&plan.unmerge(&plan.merge(&xs).unwrap()).unwrap(), &xs) > 1e-3);
    }

    #[test]
    fn odd_grids_counts_and_group_means() {
        // 7 wide × 5 high: 3 × 2 cells fit, 6 destinations, 29 sources (the last row and column included).
        let xs = random_tokens(3, 35, 4, 3);
        let choice = [3, 1, 0, 2, 2, 1];
        let plan = bipartite_soft_matching(&xs, (5, 7), (2, 2), 17, &choice)
            .unwrap()
            .unwrap();
        assert_eq!((plan.tokens(), plan.merged_tokens()), (35, 18));
        let merged = plan.merge(&xs).unwrap();
        assert_eq!(merged.dims(), &[3, 18, 4]);
        // Every group becomes copies of its mean, so each batch item's token sum is unchanged.
        let back = plan.unmerge(&merged).unwrap();
        let sums = |t: &Tensor| t.sum(1).unwrap();
        assert!(max_abs(&sums(&back), &sums(&xs)) < 1e-4);
        assert!(max_abs(&back, &xs) > 1e-3);
        // More merges asked than there are sources: all 29 merge into the 6 destinations.
        let plan = bipartite_soft_matching(&xs, (5, 7), (2, 2), 100, &choice)
            .unwrap()
            .unwrap();
        assert_eq!(plan.merged_tokens(), 6);
        let back = plan.unmerge(&plan.merge(&xs).unwrap()).unwrap();
        assert!(max_abs(&sums(&back), &sums(&xs)) < 1e-4);
    }

    #[test]
    fn nothing_merges_below_the_resolution_limit_or_without_cells() {
        let mut tome = TokenMerging::new(TomeSettings::default(), 0);
        tome.set_latent_size(8, 8);
        let full = random_tokens(2, 64, 4, 4);
        let half = random_tokens(2, 16, 4, 5);
        assert!(tome.plan(&full, (8, 8)).unwrap().is_some());
        assert!(tome.plan(&half, (4, 4)).unwrap().is_none());
        // A 1-token-high grid has no 2×2 cell, so no destination.
        tome.set_latent_size(1, 8);
        let row = random_tokens(2, 8, 4, 6);
        assert!(tome.plan(&row, (1, 8)).unwrap().is_none());
    }

    #[test]
    fn random_destinations_follow_the_seed_and_odd_batches_use_the_top_left() {
        let xs = random_tokens(2, 64, 4, 7);
        let merged_with = |seed: u64, xs: &Tensor| {
            let mut tome = TokenMerging::new(TomeSettings::default(), seed);
            tome.set_latent_size(8, 8);
            let m = tome.plan(xs, (8, 8)).unwrap().unwrap();
            m.plan().unmerge(&m.plan().merge(xs).unwrap()).unwrap()
        };
        assert_eq!(max_abs(&merged_with(1, &xs), &merged_with(1, &xs)), 0.0);
        assert!(max_abs(&merged_with(1, &xs), &merged_with(2, &xs)) > 1e-3);
        let odd = xs.narrow(0, 0, 1).unwrap();
        assert_eq!(max_abs(&merged_with(1, &odd), &merged_with(2, &odd)), 0.0);
    }

    #[test]
    fn settings_are_checked() {
        assert!(TomeSettings::default().validate().is_ok());
        let bad = [
            TomeSettings {
                ratio: 0.8,
                ..Default::default()
            },
            TomeSettings {
                ratio: -0.1,
                ..Default::default()
            },
            TomeSettings {
                sx: 0,
                ..Default::default()
            },
            TomeSettings {
                max_downsample: 0,
                ..Default::default()
            },
        ];
        for s in bad {
            assert!(s.validate().is_err(), "{s:?}");
        }
    }
}
