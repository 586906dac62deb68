#!/usr/bin/env python3
"""Writes the safety checker fixtures (tests/fixtures/safety/) with diffusers.

Run by hand from the repository root (the outputs are committed):

    /work/venv/bin/python scripts/make_safety_fixtures.py

What it writes:
  - safety/safety_checker/{config.json,model.safetensors}   a tiny random StableDiffusionSafetyChecker, tensors
                                                            named as on the Hub (`vision_model.vision_model.…`)
  - safety/feature_extractor/preprocessor_config.json      CLIPImageProcessor with SD's settings
  - safety/images/*.png                                     generated test images (solid colours, noise, a
                                                            pattern larger than 224 px)
  - safety/expected.json                                    the test images (paths relative to safety/),
                                                            diffusers' flags, scores, and how the thresholds
                                                            were chosen
  - safety/expected.safetensors                             `image_embeds` (after visual_projection, float32)
                                                            and `resized` (uint8, [n, 224, 224, 3]: the
                                                            feature extractor's resize + centre crop, before
                                                            rescaling and normalising)

The checker's weights are random. Its concept thresholds (`concept_embeds_weights`,
`special_care_embeds_weights`) are chosen from the test images' cosine similarities so that some images
are flagged and some are not, every decision clears the rounding boundary by a margin, and one flagged
image is flagged only because it also hits a special-care concept (its best concept score is -0.005,
lifted over 0 by the special-care adjustment of 0.01).

Determinism: seeded torch generators, one thread, sorted JSON.
"""

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker  # noqa: E402
from transformers import CLIPConfig, CLIPImageProcessor  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "safety"

# Existing fixture images, relative to tests/fixtures/safety/.
EXISTING_IMAGES = [
    "../init-64.png",
    "../init-72x56.png",
    "../cases/sd1-pndm-s42/0.png",
    "../cases/sd2-euler-s7/0.png",
    "../cases/p2p-euler-s3/0.png",
]

VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
TEXT = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
PROJECTION_DIM = 16

# Margin (in cosine units) by which every decision must clear the rounding boundary, and where the
# special-care-decided image's best concept score is put (the adjustment is +0.01).
MIN_MARGIN = 0.003
SPECIAL_DECIDED_SCORE = -0.005


README = """# Safety checker fixtures

Written by `scripts/make_safety_fixtures.py` (run by hand: `/work/venv/bin/python scripts/make_safety_fixtures.py`
from the repository root). Do not edit by hand. Generated with torch {torch}, diffusers {diffusers},
transformers {transformers} (its `CLIPImageProcessor` falls back to the PIL backend without torchvision,
which is what transformers 4 always used), CPU, float32, one thread.

| path | what |
|---|---|
| `safety_checker/` | a tiny random `StableDiffusionSafetyChecker` (vision: hidden 32, 2 layers, 4 heads, image 224, patch 32; projection 16), tensors named as on the Hub (`vision_model.vision_model.…`) |
| `feature_extractor/preprocessor_config.json` | `CLIPImageProcessor` with SD's settings (shortest edge 224 bicubic, centre crop 224, CLIP mean/std) |
| `images/` | generated test images: solid colours, uniform noise, a smooth pattern larger than 224 px |
| `expected.json` | `images` (paths relative to this folder; the others are the main fixtures' init images and case outputs), diffusers' `flags`, `concept_scores` / `special_scores` (unrounded, with the special-care adjustment), `special_care_image`, `margin` |
| `expected.safetensors` | `image_embeds` (float32, after `visual_projection`) and `resized` (uint8 `[n, 224, 224, 3]`: the image processor's resize + centre crop, before rescaling and normalising) |

The weights are random; the concept thresholds are chosen from the images' cosine similarities so that
flags are {flags}: each image's best concept score is at least {margin:.3f} from 0, except image {special}, whose best
concept score is -0.005 and which is flagged only because it also hits a special-care concept (+0.01).
"""


def generated_images():
    """Test images made here, saved as PNG: (file name, PIL image)."""
    g = torch.Generator().manual_seed(1234)
    noise = (torch.rand(200, 300, 3, generator=g) * 255).round().to(torch.uint8).numpy()
    y, x = np.mgrid[0:300, 0:400].astype(np.float64)
    pattern = np.stack(
        [
            128 + 100 * np.sin(x / 9.0) * np.cos(y / 13.0),
            128 + 90 * np.sin((x + y) / 17.0),
            255 * x / 399.0,
        ],
        axis=-1,
    ).round().clip(0, 255).astype(np.uint8)
    return [
        ("red-64.png", Image.new("RGB", (64, 64), (220, 30, 40))),
        ("grey-96x128.png", Image.new("RGB", (96, 128), (128, 128, 128))),
        ("noise-300x200.png", Image.fromarray(noise)),
        ("pattern-400x300.png", Image.fromarray(pattern)),
    ]


def randomize(checker, g):
    """Re-draws the weights so that different images give clearly different embeddings."""
    with torch.no_grad():
        for name, p in checker.named_parameters():
            if name.endswith("_embeds") or name.endswith("_embeds_weights"):
                continue
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith("class_embedding"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("position_embedding.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                gain = 1.5 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * (gain / math.sqrt(fan_in)))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        checker.concept_embeds.copy_(torch.randn(checker.concept_embeds.shape, generator=g))
        checker.special_care_embeds.copy_(torch.randn(checker.special_care_embeds.shape, generator=g))


def legacy_names(path):
    """Renames `vision_model.X` to `vision_model.vision_model.X`, the nesting of every safety checker on the
    Hub (transformers 5 saves the flat form but reads both)."""
    tensors = load_file(path)
    renamed = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in tensors.items()}
    save_file(renamed, path, metadata={"format": "pt"})


def cosine(a, b):
    a = torch.nn.functional.normalize(a)
    b = torch.nn.functional.normalize(b)
    return (a @ b.t()).numpy().astype(np.float64)


def choose_thresholds(cos, special_cos):
    """Picks thresholds with the largest margin. Returns (concept_w, special_w, flagged, special_image, margin)."""
    n, concepts = cos.shape
    best = None
    for s in range(n):
        # special care: the concept that best separates image s from the others; the rest never fire
        gaps = [special_cos[s, k] - np.delete(special_cos[:, k], s).max() for k in range(special_cos.shape[1])]
        k = int(np.argmax(gaps))
        if gaps[k] < 2 * MIN_MARGIN:
            continue
        special_w = np.full(special_cos.shape[1], 1.5)
        special_w[k] = special_cos[s, k] - gaps[k] / 2
        adj = np.zeros(n)
        adj[s] = 0.01
        for size in range(3, n - 2):
            for flagged in itertools.combinations([i for i in range(n) if i != s], size - 1):
                flagged = set(flagged) | {s}
                unflagged = [i for i in range(n) if i not in flagged]
                # largest margin m such that: unflagged stay m below 0, other flagged images reach m
                # above 0 on some concept, and image s's best score is SPECIAL_DECIDED_SCORE
                lo, hi = 0.0, 0.2
                found = None
                for _ in range(30):
                    m = (lo + hi) / 2
                    w = (cos[unflagged] + adj[unflagged, None]).max(axis=0) + m
                    w = np.maximum(w, cos[s] - SPECIAL_DECIDED_SCORE)
                    ok = abs((cos[s] - w).max() - SPECIAL_DECIDED_SCORE) < 1e-9
                    for i in flagged - {s}:
                        ok &= (cos[i] - w + adj[i]).max() >= m
                    if ok:
                        lo, found = m, w
                    else:
                        hi = m
                if found is not None and lo >= MIN_MARGIN and (best is None or lo > best[4]):
                    best = (found, special_w, sorted(flagged), s, lo)
    if best is None:
        raise SystemExit("no threshold choice separates the images; change the seed")
    return best


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "images").mkdir(parents=True)

    images = []
    for rel in EXISTING_IMAGES:
        images.append((rel, Image.open(OUT / rel).convert("RGB")))
    for name, im in generated_images():
        im.save(OUT / "images" / name)
        images.append((f"images/{name}", Image.open(OUT / "images" / name).convert("RGB")))

    config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=PROJECTION_DIM)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    randomize(checker, torch.Generator().manual_seed(42))

    processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3
    )
    pil = [im for _, im in images]
    clip_input = processor(pil, return_tensors="pt").pixel_values
    resized = processor(pil, do_rescale=False, do_normalize=False, return_tensors="np").pixel_values
    resized = np.stack(resized).astype(np.uint8).transpose(0, 2, 3, 1)  # [n, 224, 224, 3]
    mean = np.array(processor.image_mean, dtype=np.float32)
    std = np.array(processor.image_std, dtype=np.float32)
    again = ((resized.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    assert np.abs(again - clip_input.numpy()).max() < 1e-5, "resized uint8 images do not reproduce clip_input"

    with torch.no_grad():
        pooled = checker.vision_model(clip_input)[1]
        embeds = checker.visual_projection(pooled)
    cos = cosine(embeds, checker.concept_embeds)
    special_cos = cosine(embeds, checker.special_care_embeds)
    concept_w, special_w, flagged, special_image, margin = choose_thresholds(cos, special_cos)
    with torch.no_grad():
        checker.concept_embeds_weights.copy_(torch.tensor(concept_w, dtype=torch.float32))
        checker.special_care_embeds_weights.copy_(torch.tensor(special_w, dtype=torch.float32))

    arrays = [np.array(im, dtype=np.float32) / 255.0 for im in pil]
    _, has_nsfw = checker(clip_input=clip_input, images=arrays)
    has_nsfw = [bool(x) for x in has_nsfw]
    assert [i for i, f in enumerate(has_nsfw) if f] == flagged, (has_nsfw, flagged)

    # the special-care-decided image must not be flagged without the adjustment
    saved = checker.special_care_embeds_weights.clone()
    with torch.no_grad():
        checker.special_care_embeds_weights.fill_(1.5)
        _, without_special = checker(clip_input=clip_input, images=[a.copy() for a in arrays])
        checker.special_care_embeds_weights.copy_(saved)
    assert not without_special[special_image] and [bool(x) for x in without_special].count(True) == len(flagged) - 1

    checker.save_pretrained(OUT / "safety_checker", safe_serialization=True)
    legacy_names(OUT / "safety_checker" / "model.safetensors")
    reloaded = StableDiffusionSafetyChecker.from_pretrained(OUT / "safety_checker").eval()
    with torch.no_grad():
        assert torch.equal(reloaded.visual_projection(reloaded.vision_model(clip_input)[1]), embeds)
    processor.save_pretrained(OUT / "feature_extractor")
    save_file(
        {
            "image_embeds": embeds.contiguous(),
            "resized": torch.from_numpy(np.ascontiguousarray(resized)),
        },
        OUT / "expected.safetensors",
    )
    sw = checker.special_care_embeds_weights
    cw = checker.concept_embeds_weights
    expected = {
        "images": [rel for rel, _ in images],
        "flags": has_nsfw,
        "special_care_image": special_image,
        "margin": round(float(margin), 6),
        "concept_scores": [
            [round(float(cos[i, j] - cw[j].item() + (0.01 if i == special_image else 0.0)), 6) for j in range(cos.shape[1])]
            for i in range(len(images))
        ],
        "special_scores": [
            [round(float(special_cos[i, k] - sw[k].item()), 6) for k in range(special_cos.shape[1])]
            for i in range(len(images))
        ],
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "image_processor": type(processor).__name__,
        },
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")

    (OUT / "README.md").write_text(README.format(
        torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
        flags=has_nsfw, special=special_image, margin=margin,
    ))
    print(f"flags: {has_nsfw}  special-care image: {special_image}  margin: {margin:.4f}")


if __name__ == "__main__":
    main()
