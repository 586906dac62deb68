"""Writes the reference fixtures for Pictor's LMS, Heun, KDPM2, KDPM2-ancestral and DDPM schedulers.

Like scripts/make_scheduler_fixtures.py (same configs, same fake UNet and tensors), for
LMSDiscreteScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler and
DDPMScheduler: the schedule after `from_config(...)` + `set_timesteps(n)` for step counts 1, 2, 3, 7, 10, 20,
50, every timestep spacing, with and without Karras sigmas, for SD 1.5-like (epsilon) and SD 2-like
(v_prediction) configs; LMS coefficients as scipy integrates them; and img2img-shaped runs (slice by
t_start * order, set_begin_index, add_noise, then scale_model_input and step for every remaining timestep)
with a seeded generator for the stochastic ones.

Run by hand (never by CI) from the repository root:

    /work/venv/bin/python scripts/make_scheduler_fixtures_k.py

It rewrites tests/fixtures/schedulers/k_schedules.json and tests/fixtures/schedulers/k_runs.json.
Scalar lists are {"f32le": hex} (float32) or {"f64le": hex} (float64, when diffusers' tensor is float64);
tensors are {"shape": [...], "f32le": hex}.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
from diffusers import (
    DDPMScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "schedulers"

CLASSES = {
    "LMSDiscreteScheduler": LMSDiscreteScheduler,
    "HeunDiscreteScheduler": HeunDiscreteScheduler,
    "KDPM2DiscreteScheduler": KDPM2DiscreteScheduler,
    "KDPM2AncestralDiscreteScheduler": KDPM2AncestralDiscreteScheduler,
    "DDPMScheduler": DDPMScheduler,
}
KARRAS_CAPABLE = {
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
}
STOCHASTIC = {"KDPM2AncestralDiscreteScheduler", "DDPMScheduler"}

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
SD2V = dict(SD15, _class_name="DDIMScheduler", _diffusers_version="0.8.0", prediction_type="v_prediction")

SHAPE = (1, 4, 3, 5)


def scalars(values):
    t = torch.as_tensor(np.asarray(values)) if not isinstance(values, torch.Tensor) else values
    t = t.detach().reshape(-1)
    if t.dtype == torch.float64:
        return {"f64le": t.numpy().astype("<f8").tobytes().hex()}
    return {"f32le": t.to(torch.float32).numpy().astype("<f4").tobytes().hex()}


def tensor(t):
    t = t.detach().to(torch.float32).contiguous()
    return {"shape": list(t.shape), "f32le": t.numpy().astype("<f4").tobytes().hex()}


def scalar(v):
    if isinstance(v, torch.Tensor):
        return float(v.to(torch.float32).item())
    return float(np.float32(v))


def make(name, config, steps, use_karras):
    kwargs = {"use_karras_sigmas": True} if use_karras else {}
    sched = CLASSES[name].from_config(dict(config), **kwargs)
    sched.set_timesteps(steps)
    return sched


def describe(sched):
    sigmas = getattr(sched, "sigmas", None)
    return {
        "timesteps": scalars(sched.timesteps),
        "init_noise_sigma": scalar(sched.init_noise_sigma),
        "order": int(sched.order),
        "sigmas": scalars(sigmas) if sigmas is not None else None,
    }


def schedule_cases():
    cases = []
    for name in CLASSES:
        for cfg_name, cfg in {"sd15": SD15, "sd2v": SD2V}.items():
            spacings = ["leading", "linspace", "trailing"]
            for spacing in spacings:
                config = dict(cfg, timestep_spacing=spacing)
                for steps in [1, 2, 3, 7, 10, 20, 50]:
                    for karras in [False, True] if name in KARRAS_CAPABLE else [False]:
                        sched = make(name, config, steps, karras)
                        case = {
                            "scheduler": name,
                            "label": f"{cfg_name}/{spacing}",
                            "config": config,
                            "use_karras_sigmas": karras,
                            "steps": steps,
                        }
                        case.update(describe(sched))
                        cases.append(case)
    extra = [
        ("DDPMScheduler", {}, [10, 1000]),
        ("DDPMScheduler", SD15, [10]),
        ("DDPMScheduler", dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"), [10]),
        ("HeunDiscreteScheduler", {}, [10]),
        ("KDPM2DiscreteScheduler", {}, [10]),
        ("LMSDiscreteScheduler", {}, [10]),
        ("LMSDiscreteScheduler", dict(SD15, use_exponential_sigmas=True), [10]),
        ("HeunDiscreteScheduler", dict(SD15, use_exponential_sigmas=True), [10]),
        ("KDPM2DiscreteScheduler", dict(SD15, use_exponential_sigmas=True), [10]),
        ("KDPM2AncestralDiscreteScheduler", dict(SD15, use_exponential_sigmas=True), [10]),
        ("HeunDiscreteScheduler", dict(SD15, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), [10]),
        ("LMSDiscreteScheduler", dict(SD15, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), [10]),
        ("KDPM2DiscreteScheduler", dict(SD15, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), [10]),
        ("KDPM2AncestralDiscreteScheduler", dict(SD15, beta_schedule="squaredcos_cap_v2"), [10]),
        ("LMSDiscreteScheduler", dict(SD15, rescale_betas_zero_snr=True), [10]),
    ]
    for name, config, step_list in extra:
        for steps in step_list:
            sched = make(name, config, steps, False)
            case = {"scheduler": name, "label": "extra", "config": config, "use_karras_sigmas": False, "steps": steps}
            case.update(describe(sched))
            cases.append(case)
    return cases


def lms_coefficients():
    out = []
    for config, steps, karras in [(SD15, 10, False), (SD2V, 50, True), (dict(SD15, timestep_spacing="leading"), 7, False)]:
        sched = make("LMSDiscreteScheduler", config, steps, karras)
        coeffs = []
        for t in range(steps):
            for order in range(1, min(t + 1, 4) + 1):
                for cur in range(order):
                    coeffs.append([order, t, cur, sched.get_lms_coefficient(order, t, cur)])
        out.append({"config": config, "steps": steps, "use_karras_sigmas": karras, "coefficients": coeffs})
    return out


def fake_unet(x, t):
    return x * 0.1 + BASE * (float(t) / 1000.0)


def run_case(name, config, steps, strength, use_karras=False, seed=None):
    if seed is None and name in STOCHASTIC:
        seed = 1234
    sched = make(name, config, steps, use_karras)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = sched.timesteps[t_start * sched.order :]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    latents = sched.add_noise(INIT, NOISE, timesteps[:1])
    record = {
        "scheduler": name,
        "config": config,
        "use_karras_sigmas": use_karras,
        "steps": steps,
        "strength": strength,
        "t_start": t_start,
        "seed": seed,
        "timesteps": scalars(timesteps),
        "init_noise_sigma": scalar(sched.init_noise_sigma),
        "noised": tensor(latents),
        "trajectory": [],
    }
    generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
    for t in timesteps:
        scaled = sched.scale_model_input(latents, t)
        out = fake_unet(scaled, t)
        kwargs = {"generator": generator} if name in STOCHASTIC else {}
        latents = sched.step(out, t, latents, return_dict=False, **kwargs)[0]
        record["trajectory"].append({"t": float(t), "prev_sample": tensor(latents)})
    if not torch.isfinite(latents).all():
        print(f"warning: {name} {config} steps={steps} strength={strength}: non-finite result", file=sys.stderr)
    return record


def runs():
    out = []
    for name in CLASSES:
        for strength in [0.3, 0.75, 1.0]:
            out.append(run_case(name, SD15, 10, strength))
        for strength in [0.75, 1.0]:
            out.append(run_case(name, dict(SD2V, timestep_spacing="trailing"), 7, strength))
        out.append(run_case(name, dict(SD15, timestep_spacing="leading"), 20, 0.75))
        out.append(run_case(name, dict(SD15, timestep_spacing="linspace"), 7, 1.0))
        out.append(run_case(name, SD15, 5, 0.3))
        out.append(run_case(name, SD15, 3, 1.0))
        out.append(run_case(name, SD15, 1, 1.0))
        if name in KARRAS_CAPABLE:
            for strength in [0.3, 0.75, 1.0]:
                out.append(run_case(name, SD15, 10, strength, use_karras=True))
            out.append(run_case(name, SD2V, 25, 0.2, use_karras=True))
    out.append(run_case("LMSDiscreteScheduler", dict(SD15, prediction_type="sample"), 7, 1.0))
    out.append(run_case("HeunDiscreteScheduler", dict(SD15, prediction_type="sample", clip_sample=True), 7, 1.0))
    out.append(run_case("HeunDiscreteScheduler", dict(SD2V, clip_sample=True, clip_sample_range=0.5), 7, 0.75))
    out.append(run_case("LMSDiscreteScheduler", SD15, 50, 0.75))
    out.append(run_case("DDPMScheduler", dict(SD15, variance_type="fixed_small_log"), 7, 1.0))
    out.append(run_case("DDPMScheduler", dict(SD15, variance_type="fixed_large"), 7, 0.75))
    out.append(run_case("DDPMScheduler", dict(SD15, clip_sample=True, steps_offset=0), 7, 1.0))
    out.append(run_case("DDPMScheduler", dict(SD15, prediction_type="sample", timestep_spacing="linspace"), 7, 1.0))
    out.append(run_case("DDPMScheduler", dict(SD2V, rescale_betas_zero_snr=True, timestep_spacing="trailing"), 7, 1.0))
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
        "generator": "scripts/make_scheduler_fixtures_k.py",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "k_schedules.json", "w") as f:
        json.dump({"meta": meta, "cases": schedule_cases(), "lms_coefficients": lms_coefficients()}, f, separators=(",", ":"))
        f.write("\n")
    run_file = {
        "meta": meta,
        "fake_unet": "model_output = scaled_input * 0.1 + base * (t / 1000)",
        "init": tensor(INIT),
        "noise": tensor(NOISE),
        "base": tensor(BASE),
        "runs": runs(),
    }
    with open(OUT / "k_runs.json", "w") as f:
        json.dump(run_file, f, separators=(",", ":"))
        f.write("\n")
    for p in sorted(OUT.glob("k_*.json")):
        print(f"{p}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
