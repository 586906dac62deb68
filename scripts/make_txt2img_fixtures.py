#!/usr/bin/env python3
"""Writes Pictor's text-to-image reference fixtures with diffusers' StableDiffusionPipeline and
StableDiffusionXLPipeline, on the tiny random models the other fixture scripts already wrote.

Run by hand from the repository root after make_fixtures.py and make_sdxl_fixtures.py (never by CI; the
outputs are committed):

    /work/venv/bin/python scripts/make_txt2img_fixtures.py      # ~20 seconds on 2 cores

What it writes:
  - tests/fixtures/txt2img/cases.json   cases in the tests/fixtures/cases.json format, with pipeline "txt2img",
        no init image and no strength; names start with "t2i-" (unique beside the img2img cases)
  - tests/fixtures/txt2img/cases/<name>/<i>.png   diffusers' images (numpy_to_pil rounding)

Covered: several schedulers (the model's own PNDM, DDIM, Euler, Euler a, DPM++ 2M Karras, DPM++ 2M SDE Karras
through algorithm_type, UniPC, LCM), seeds, non-square sizes, samples > 1 (one latent draw of the whole batch),
clip skip, guidance off, a missing negative prompt, a v-prediction model (sd2-tiny), SDXL (zero unconditional
embeddings for a missing negative prompt, clip skip, time ids of the output size) and SDXL-Turbo's one-step
recipe.

Determinism: as make_fixtures.py (seeded generators, one thread, sorted JSON).
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets one thread, silences diffusers)
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402

OUT = mf.FIX / "txt2img"


def case(name, model, scheduler, seed, **kw):
    c = dict(
        name=name,
        model=model,
        pipeline="txt2img",
        prompt=mf.PROMPT,
        negative_prompt="blurry",
        init_image=None,
        width=64,
        height=64,
        samples=1,
        num_inference_steps=8,
        guidance_scale=7.5,
        strength=None,
        image_guidance_scale=None,
        seed=seed,
        scheduler=scheduler,
        use_karras_sigmas=None,
        algorithm_type=None,
        clip_skip=1,
    )
    c.update(kw)
    return c


def all_cases():
    sd1, sd2, xl, turbo = "sd1-tiny", "sd2-tiny", "sdxl-tiny", "sdxl-turbo-tiny"
    return [
        case("t2i-sd1-pndm-s42", sd1, "PNDMScheduler", 42),
        case("t2i-sd1-ddim-s42", sd1, "DDIMScheduler", 42),
        case("t2i-sd1-euler-s7", sd1, "EulerDiscreteScheduler", 7),
        case("t2i-sd1-eulera-80x48-s3-n2", sd1, "EulerAncestralDiscreteScheduler", 3, width=80, height=48, samples=2),
        case("t2i-sd1-dpm2m-karras-s11", sd1, "DPMSolverMultistepScheduler", 11, use_karras_sigmas=True),
        case("t2i-sd1-dpm2msde-karras-s11", sd1, "DPMSolverMultistepScheduler", 11, use_karras_sigmas=True,
             algorithm_type="sde-dpmsolver++"),
        case("t2i-sd1-unipc-s5", sd1, "UniPCMultistepScheduler", 5, num_inference_steps=6),
        case("t2i-sd1-lcm-s5", sd1, "LCMScheduler", 5, num_inference_steps=4, guidance_scale=1.0),
        case("t2i-sd1-euler-clipskip2-s0", sd1, "EulerDiscreteScheduler", 0, clip_skip=2),
        case("t2i-sd1-euler-noneg-s0", sd1, "EulerDiscreteScheduler", 0, negative_prompt=None),
        case("t2i-sd1-euler-cfg1-s0-n2", sd1, "EulerDiscreteScheduler", 0, guidance_scale=1.0, samples=2),
        case("t2i-sd2-euler-72x56-s5-n2", sd2, "EulerDiscreteScheduler", 5, width=72, height=56, samples=2,
             guidance_scale=6.0),
        case("t2i-sd2-ddim-s5", sd2, "DDIMScheduler", 5, guidance_scale=6.0),
        case("t2i-sdxl-euler-s42", xl, "EulerDiscreteScheduler", 42, guidance_scale=6.0),
        case("t2i-sdxl-eulera-72x56-s7-n2", xl, "EulerAncestralDiscreteScheduler", 7, width=72, height=56,
             samples=2, guidance_scale=6.0),
        case("t2i-sdxl-euler-noneg-s0", xl, "EulerDiscreteScheduler", 0, negative_prompt=None, guidance_scale=6.0),
        case("t2i-sdxl-dpm2m-clipskip2-s0", xl, "DPMSolverMultistepScheduler", 0, clip_skip=2, guidance_scale=6.0),
        # SDXL-Turbo's text-to-image recipe (diffusers' docs): one step, no guidance, trailing spacing.
        case("t2i-sdxl-turbo-eulera-s5", turbo, "EulerAncestralDiscreteScheduler", 5, num_inference_steps=1,
             guidance_scale=0.0, negative_prompt=None),
    ]


def load_pipeline(model_id):
    cls = StableDiffusionXLPipeline if model_id.startswith("sdxl") else StableDiffusionPipeline
    pipe = cls.from_pretrained(mf.CKPT / model_id, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(pipe, c, base_config):
    overrides = {k: c[k] for k in ("use_karras_sigmas", "algorithm_type") if c.get(k) is not None}
    pipe.scheduler = mf.SCHEDULERS[c["scheduler"]].from_config(base_config, **overrides)
    kw = dict(
        prompt=c["prompt"],
        negative_prompt=c["negative_prompt"],
        width=c["width"],
        height=c["height"],
        num_inference_steps=c["num_inference_steps"],
        guidance_scale=c["guidance_scale"],
        num_images_per_prompt=c["samples"],
        generator=torch.Generator("cpu").manual_seed(c["seed"]),
        output_type="np",
    )
    if c["clip_skip"] > 1:
        if isinstance(pipe, StableDiffusionXLPipeline) or hasattr(pipe.text_encoder, "text_model"):
            kw["clip_skip"] = c["clip_skip"] - 1
        else:
            # As make_fixtures.py: diffusers 0.42's SD clip_skip path does not work with transformers 5, so the
            # embeddings are computed exactly as it would (prompt at hidden_states[-(skip + 1)] + final norm,
            # negative without clip skip).
            kw.update(mf.clip_skip_embeds(pipe, c))
            del kw["prompt"], kw["negative_prompt"]
    timesteps = []

    def callback(p, i, t, tensors):
        timesteps.append(float(t))
        return {}

    out = pipe(**kw, callback_on_step_end=callback).images
    return out, timesteps


NOTES = {
    "noneg": "negative_prompt null: SD encodes \"\" for the unconditional half; the SDXL base "
             "(force_zeros_for_empty_prompt) uses zeros for the embeddings and the pooled embedding.",
    "cfg1": "guidance_scale 1: no classifier-free guidance, the UNet batch holds only the samples.",
    "clipskip": "Pictor clip_skip 2 = diffusers clip_skip 1, applied to the prompt only.",
    "-n2": "samples 2: one randn draw of shape (2, 4, h/8, w/8) from the seeded generator, times the scheduler's "
           "init_noise_sigma.",
    "turbo": "SDXL-Turbo: EulerAncestral with trailing spacing, 1 step, guidance 0.",
}


def main():
    pipes = {}
    records = []
    images = {}
    if OUT.exists():
        shutil.rmtree(OUT)
    for c in all_cases():
        if c["model"] not in pipes:
            pipe = load_pipeline(c["model"])
            pipes[c["model"]] = (pipe, dict(pipe.scheduler.config))
        pipe, base_config = pipes[c["model"]]
        out, timesteps = run_case(pipe, c, base_config)
        d = OUT / "cases" / c["name"]
        d.mkdir(parents=True)
        paths = []
        for i, arr in enumerate(out):
            mf.to_png(arr).save(d / f"{i}.png")
            paths.append(f"txt2img/cases/{c['name']}/{i}.png")
        records.append(dict(c, images=paths, notes=[n for k, n in NOTES.items() if k in c["name"]],
                            timesteps=[int(x) if float(x).is_integer() else x for x in timesteps]))
        images[c["name"]] = out
        print(f"  {c['name']:<28} mean {out.mean():.3f} std {out.std():.3f} steps {len(timesteps)}", flush=True)
    # The networks must matter: the same seed under different settings gives different images.
    for a, b in (("sd1-euler-noneg-s0", "sd1-euler-clipskip2-s0"), ("sd1-euler-noneg-s0", "sd1-euler-cfg1-s0-n2"),
                 ("sd1-pndm-s42", "sd1-ddim-s42"), ("sdxl-euler-noneg-s0", "sdxl-dpm2m-clipskip2-s0")):
        a, b = f"t2i-{a}", f"t2i-{b}"
        diff = np.abs(images[a][0] - images[b][0]).mean()
        assert diff > 0.005, f"{a} and {b} are nearly identical ({diff})"
    for name, out in images.items():
        assert out.std() > 0.02, f"{name} is nearly flat"
    mf.write_json(OUT / "cases.json", records)
    print(f"done: {len(records)} cases in {OUT}", flush=True)


if __name__ == "__main__":
    main()
