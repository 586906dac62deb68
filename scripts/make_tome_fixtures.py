#!/usr/bin/env python3
"""Writes the token-merging reference fixtures (tests/fixtures/tome/) with tomesd on diffusers.

Run by hand from the repository root, after scripts/make_fixtures.py (it uses its tiny models, init
images and case conventions):

    /work/venv/bin/python scripts/make_tome_fixtures.py     # ~20 s

What it writes:
  - tome/cases.json: one object per generation, the fields of tests/fixtures/cases.json plus
    `tome` (tomesd.apply_patch arguments) and `plain_images` (the same run without tomesd, for reference)
  - tome/<name>/<i>.png: diffusers' output with tomesd applied, `(x*255).round()` as uint8
  - tome/<name>/tensors.safetensors: `latents_step_<k>` and `image`, as in make_fixtures.py
  - tome/matching.safetensors: tomesd's bipartite_soft_matching_random2d on a random metric over an
    odd 7 x 5 grid (tokens outside the 2 x 2 cells that fit), merged and unmerged, with and without
    random destinations (see `matching_fixture`)

Destination choice: tomesd draws it (use_rand=True, its default) from a generator forked from torch's
global one at the first merged block. Pictor draws it from torch.Generator("cpu").manual_seed(seed) of
the request seed, so this script sets tomesd's generator to exactly that before each run.

With tomesd's defaults, merging happens only in blocks at the full latent resolution: sd1-tiny's VAE
halves the size, so 64 x 64 images give 32 x 32 latents (1024 tokens, 512 merged away in the two
down-block and three up-block transformers), and the 16 x 16 level is left alone.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets one thread, silences diffusers)
import tomesd  # noqa: E402
from tomesd import merge as tmerge  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = mf.FIX / "tome"


def cases():
    default = dict(ratio=0.5, max_downsample=1, sx=2, sy=2, use_rand=True, merge_attn=True,
                   merge_crossattn=False, merge_mlp=False)
    out = []

    def add(case, **tome):
        case["tome"] = dict(default, **tome)
        out.append(case)

    # CFG batch of 2: random destinations. Short runs: every merged block is a chance for a near-tie that
    # float rounding decides (see Margins), and one flipped choice moves the rest of the trajectory.
    add(mf.img2img_case("tome-sd1-ddim-s42", "sd1-tiny", "DDIMScheduler", 42, strength=0.2))
    # The same with the top-left destination of every cell.
    add(mf.img2img_case("tome-sd1-ddim-norand-s42", "sd1-tiny", "DDIMScheduler", 42), use_rand=False)
    # Two samples with CFG (batch 4), a higher ratio and merging around every operation.
    add(mf.img2img_case("tome-sd1-eulera-all-s7-n2", "sd1-tiny", "EulerAncestralDiscreteScheduler", 7,
                        samples=2, num_inference_steps=6, strength=0.2),
        ratio=0.7, merge_crossattn=True, merge_mlp=True)
    # No CFG, one sample: odd batch, tomesd turns use_rand off.
    add(mf.img2img_case("tome-sd1-pndm-cfg1-s3", "sd1-tiny", "PNDMScheduler", 3, guidance_scale=1.0))
    # InstructPix2Pix: batch of 3 (odd), top-left destinations.
    add(mf.pix2pix_case("tome-p2p-eulera-s3", "EulerAncestralDiscreteScheduler"))
    return out


class Margins:
    """Records, for every merged block of a run, how far tomesd's discrete choices are from flipping: the
    gap between the r-th and (r+1)-th best source score (which sources merge) and, over the merged sources,
    the smallest gap between the best and second-best destination (where they go). Cosine similarities
    closer than float32 rounding (~1e-6) cannot be decided the same way by two implementations; the cases
    are chosen so that every margin is well above that."""

    def __enter__(self):
        self.margins = []
        self.orig = tmerge.bipartite_soft_matching_random2d

        def wrapped(metric, w, h, sx, sy, r, no_rand=False, generator=None):
            state = generator.get_state() if generator is not None else None
            out = self.orig(metric, w, h, sx, sy, r, no_rand, generator)
            hsy, wsx = h // sy, w // sx
            if no_rand:
                choice = torch.zeros(hsy * wsx, dtype=torch.int64)
            else:
                g = torch.Generator("cpu")
                g.set_state(state)
                choice = torch.randint(sy * sx, size=(hsy * wsx,), generator=g)
            dst = torch.zeros(h, w, dtype=torch.bool)
            for cell, k in enumerate(choice.tolist()):
                i, j = divmod(cell, wsx)
                dst[i * sy + k // sx, j * sx + k % sx] = True
            dst = dst.flatten()
            m = metric / metric.norm(dim=-1, keepdim=True)
            scores = m[:, ~dst] @ m[:, dst].transpose(-1, -2)
            top2 = scores.topk(2, dim=-1).values
            node_max = top2[..., 0]
            srt = node_max.sort(dim=-1, descending=True)
            rr = min(r, node_max.shape[1])
            boundary = (srt.values[:, rr - 1] - srt.values[:, rr]).min().item() if rr < node_max.shape[1] else 1.0
            merged = srt.indices[:, :rr]
            gaps = (top2[..., 0] - top2[..., 1]).gather(1, merged)
            self.margins.append(min(boundary, gaps.min().item()))
            return out

        tmerge.bipartite_soft_matching_random2d = wrapped
        return self

    def __exit__(self, *exc):
        tmerge.bipartite_soft_matching_random2d = self.orig


MIN_MARGIN = 1e-4


def run(pipe, base_config, case):
    tomesd.remove_patch(pipe)
    if case.get("tome") is not None:
        tomesd.apply_patch(pipe, **case["tome"])
        pipe.unet._tome_info["args"]["generator"] = torch.Generator("cpu").manual_seed(case["seed"])
    try:
        return mf.run_case(pipe, case, base_config)
    finally:
        tomesd.remove_patch(pipe)


def matching_fixture():
    """tomesd's matching on a (2, 35, 6) metric over a 7 wide x 5 high grid, r = 17, 2 x 2 cells
    (3 x 2 of them fit; the last column and row are all sources). `metric` is merged and then unmerged:
    `merged_norand` / `unmerged_norand` with the top-left destinations, `merged_rand` / `unmerged_rand`
    with destinations drawn by torch.Generator('cpu').manual_seed(5)."""
    gen = torch.Generator("cpu").manual_seed(77)
    metric = torch.randn(2, 35, 6, generator=gen)
    # Two exact duplicates so that some sources match a destination perfectly.
    metric[:, 8] = metric[:, 0]
    t = {"metric": metric}
    for tag, no_rand in (("norand", True), ("rand", False)):
        g = torch.Generator("cpu").manual_seed(5)
        m, u = tmerge.bipartite_soft_matching_random2d(metric, w=7, h=5, sx=2, sy=2, r=17, no_rand=no_rand,
                                                       generator=g)
        merged = m(metric)
        t[f"merged_{tag}"] = merged
        t[f"unmerged_{tag}"] = u(merged)
    save_file({k: v.contiguous() for k, v in t.items()}, OUT / "matching.safetensors", metadata={"format": "pt"})


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    pipes = {}
    records = []
    for case in cases():
        model = case["model"]
        if model not in pipes:
            pipe = mf.load_pipeline(model)
            pipes[model] = (pipe, dict(pipe.scheduler.config))
        pipe, base_config = pipes[model]
        with Margins() as margins:
            out, tensors, timesteps = run(pipe, base_config, case)
        margin = min(margins.margins)
        print(f"  {case['name']:<28} {len(margins.margins)} merged blocks, smallest decision margin {margin:.2e}")
        plain, _, _ = run(pipe, base_config, dict(case, tome=None))
        d = OUT / case["name"]
        d.mkdir()
        images = []
        for i, arr in enumerate(out):
            mf.to_png(arr).save(d / f"{i}.png")
            images.append(f"tome/{case['name']}/{i}.png")
        keep = {k: v for k, v in tensors.items() if k.startswith("latents_step_") or k == "image"}
        save_file({k: v.float().contiguous() for k, v in sorted(keep.items())}, d / "tensors.safetensors",
                  metadata={"format": "pt"})
        diff = np.abs(out * 255 - plain * 255)
        assert diff.max() > 6, f"{case['name']}: tomesd barely changes the image (max {diff.max():.1f})"
        records.append(dict(case, images=images, tensors=f"tome/{case['name']}/tensors.safetensors",
                            timesteps=[int(x) if float(x).is_integer() else x for x in timesteps],
                            tomesd_vs_plain=dict(max_abs_255=round(float(diff.max()), 3),
                                                 mean_abs_255=round(float(diff.mean()), 3))))
        print(f"  {case['name']:<28} tomesd vs plain: max {diff.max():.1f} mean {diff.mean():.2f} (0-255)")
    mf.write_json(OUT / "cases.json", records)
    matching_fixture()
    print("wrote", OUT)


if __name__ == "__main__":
    main()
