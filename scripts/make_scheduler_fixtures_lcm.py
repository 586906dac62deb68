"""Writes the reference fixtures for Pictor's LCMScheduler (crates/engine/src/schedulers/lcm.rs) from diffusers.

It records, for several configs (SD 1.5's own scheduler config, LCMScheduler's defaults, the LCM-LoRA config,
SD 2 v-prediction, and less common options), the timesteps after `from_config(...)` + `set_timesteps(n)` for a
range of step counts, the timesteps after `set_timesteps(n, strength=s)` (the scheduler's own img2img path, which
StableDiffusionImg2ImgPipeline does not use), which combinations diffusers rejects, and complete seeded mini-runs
shaped like StableDiffusionImg2ImgPipeline's loop (`set_timesteps(n)`, slice by t_start, set_begin_index,
add_noise, then scale_model_input and step with a torch.Generator for every remaining timestep) on small tensors,
with the same fake "UNet" as scripts/make_scheduler_fixtures.py.

Run by hand (never by CI) from the repository root, with the venv that has torch and diffusers:

    /work/venv/bin/python scripts/make_scheduler_fixtures_lcm.py

It rewrites tests/fixtures/schedulers/lcm_schedules.json and tests/fixtures/schedulers/lcm_runs.json, in the
formats of make_scheduler_fixtures.py (tensors as hex of little-endian float32).
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
from diffusers import LCMScheduler

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "schedulers"

SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
LCM_LORA = {
    "_class_name": "LCMScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
SD2V = dict(SD15, prediction_type="v_prediction", _class_name="DDIMScheduler")

CONFIGS = {
    "sd15": SD15,
    "default": {},
    "lcm_lora": LCM_LORA,
    "sd2v": SD2V,
    "orig100_clip": dict(SD15, original_inference_steps=100, clip_sample=True, clip_sample_range=0.8),
    "orig7": dict(SD15, original_inference_steps=7, timestep_scaling=4.0),
    "zero_snr_sample": dict(SD15, rescale_betas_zero_snr=True, prediction_type="sample"),
}

SHAPE = (1, 4, 3, 5)


def tensor(t):
    t = t.detach().to(torch.float32).contiguous()
    return {"shape": list(t.shape), "f32le": t.numpy().astype("<f4").tobytes().hex()}


def timesteps_of(config, steps, strength=None):
    sched = LCMScheduler.from_config(dict(config))
    try:
        if strength is None:
            sched.set_timesteps(steps)
        else:
            sched.set_timesteps(steps, strength=strength)
    except ValueError as e:
        return None, str(e)
    return [int(t) for t in sched.timesteps.tolist()], None


def schedule_cases():
    cases = []
    for label, config in CONFIGS.items():
        for steps in [1, 2, 3, 4, 6, 8, 10, 25, 49, 50, 51, 100]:
            for strength in [None, 1.0, 0.75, 0.5, 0.3, 0.1]:
                ts, err = timesteps_of(config, steps, strength)
                cases.append(
                    {
                        "label": label,
                        "config": config,
                        "steps": steps,
                        "strength": strength,
                        "timesteps": ts,
                        "error": err,
                    }
                )
    return cases


def fake_unet(x, t):
    return x * 0.1 + BASE * (float(t) / 1000.0)


def run_case(label, steps, strength, seed):
    config = CONFIGS[label]
    sched = LCMScheduler.from_config(dict(config))
    sched.set_timesteps(steps)  # as StableDiffusionImg2ImgPipeline: no strength here
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = sched.timesteps[t_start * sched.order :]
    sched.set_begin_index(t_start * sched.order)
    latents = sched.add_noise(INIT, NOISE, timesteps[:1])
    record = {
        "label": label,
        "config": config,
        "steps": steps,
        "strength": strength,
        "t_start": t_start,
        "seed": seed,
        "timesteps": [float(t) for t in timesteps.tolist()],
        "noised": tensor(latents),
        "trajectory": [],
    }
    generator = torch.Generator("cpu").manual_seed(seed)
    for t in timesteps:
        scaled = sched.scale_model_input(latents, t)
        out = fake_unet(scaled, t)
        latents = sched.step(out, t, latents, generator=generator, return_dict=False)[0]
        record["trajectory"].append({"t": float(t), "prev_sample": tensor(latents)})
    # How many normals the generator gave out, as a check on the draw order: the next draw.
    record["next_normal"] = float(torch.randn(1, generator=generator).item())
    return record


def runs():
    out = []
    for label in ["sd15", "lcm_lora", "default"]:
        for steps, strength in [(4, 1.0), (4, 0.5), (8, 0.75), (1, 1.0), (2, 1.0), (6, 0.3), (50, 0.2)]:
            out.append(run_case(label, steps, strength, seed=4321))
    out.append(run_case("sd2v", 4, 1.0, seed=7))
    out.append(run_case("orig100_clip", 5, 0.8, seed=7))
    out.append(run_case("orig7", 3, 1.0, seed=7))
    out.append(run_case("zero_snr_sample", 4, 1.0, seed=7))
    return out


def main():
    global INIT, NOISE, BASE
    if diffusers.__version__ != "0.42.1":
        print(f"warning: fixtures were designed against diffusers 0.42.1, this is {diffusers.__version__}", file=sys.stderr)
    gen = torch.Generator("cpu").manual_seed(20240607)
    INIT = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    NOISE = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    BASE = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    meta = {
        "generator": "scripts/make_scheduler_fixtures_lcm.py",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "lcm_schedules.json", "w") as f:
        json.dump({"meta": meta, "cases": schedule_cases()}, f, separators=(",", ":"))
        f.write("\n")
    run_file = {
        "meta": meta,
        "fake_unet": "model_output = scaled_input * 0.1 + base * (t / 1000)",
        "init": tensor(INIT),
        "noise": tensor(NOISE),
        "base": tensor(BASE),
        "runs": runs(),
    }
    with open(OUT / "lcm_runs.json", "w") as f:
        json.dump(run_file, f, separators=(",", ":"))
        f.write("\n")
    for name in ["lcm_schedules.json", "lcm_runs.json"]:
        p = OUT / name
        print(f"{p}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
