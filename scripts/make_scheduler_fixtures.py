"""Writes the reference fixtures for Pictor's schedulers (crates/engine/src/schedulers) from diffusers.

For DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler and EulerAncestralDiscreteScheduler it records, for
SD 1.5-like and SD 2-like (v_prediction) configs, every timestep spacing and a range of step counts: the
timesteps, sigmas, init_noise_sigma and order after `from_config(...)` + `set_timesteps(n)`, plus the
alphas_cumprod of each beta schedule. It also records complete deterministic mini-runs shaped like
StableDiffusionImg2ImgPipeline's loop (slice by t_start, set_begin_index, add_noise, then scale_model_input and
step for every remaining timestep) on small tensors, with a fake "UNet" that is a simple function of its input
and timestep, so that every step depends on the previous ones.

Run by hand (never by CI) from the repository root, with the venv that has torch and diffusers:

    /work/venv/bin/python scripts/make_scheduler_fixtures.py

It rewrites tests/fixtures/schedulers/schedules.json and tests/fixtures/schedulers/runs.json.

Formats: scalar lists (timesteps, sigmas, alphas_cumprod) are JSON numbers holding the float32 values exactly
(printed as float64). Tensors are {"shape": [...], "f32le": "<hex of the little-endian float32 bytes>"}, which
keeps the files small and exact.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "schedulers"

CLASSES = {
    "DDIMScheduler": DDIMScheduler,
    "PNDMScheduler": PNDMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
}
KARRAS_CAPABLE = {"EulerDiscreteScheduler"}

# The scheduler_config.json of Stable Diffusion 1.5 (as shipped, PNDM) and of SD 2.x 768 (v-prediction).
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
SD2V = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SHAPE = (1, 4, 3, 5)


def f32_list(values):
    """float32 values as exact JSON numbers."""
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    return [float(v) for v in arr]


def tensor(t):
    t = t.detach().to(torch.float32).contiguous()
    data = t.numpy().astype("<f4").tobytes()
    return {"shape": list(t.shape), "f32le": data.hex()}


def scalar(v):
    if isinstance(v, torch.Tensor):
        return float(v.to(torch.float32).item())
    return float(np.float32(v))


def make(name, config, steps, use_karras):
    kwargs = {"use_karras_sigmas": True} if use_karras else {}
    sched = CLASSES[name].from_config(dict(config), **kwargs)
    sched.set_timesteps(steps)
    return sched


def describe(name, sched):
    out = {
        "timesteps": [float(t) for t in sched.timesteps.to(torch.float64).tolist()],
        "init_noise_sigma": scalar(sched.init_noise_sigma),
        "order": int(sched.order),
    }
    sigmas = getattr(sched, "sigmas", None)
    out["sigmas"] = f32_list(sigmas.numpy()) if sigmas is not None else None
    return out


def schedule_cases():
    cases = []
    base_configs = {"sd15": SD15, "sd2v": SD2V}
    for name in CLASSES:
        for cfg_name, cfg in base_configs.items():
            for spacing in [None, "leading", "linspace", "trailing"]:
                config = dict(cfg)
                if spacing is not None:
                    config["timestep_spacing"] = spacing
                for steps in [1, 7, 10, 20, 50]:
                    for karras in [False, True]:
                        sched = make(name, config, steps, karras)
                        case = {
                            "scheduler": name,
                            "label": f"{cfg_name}/{spacing or 'default'}",
                            "config": config,
                            "use_karras_sigmas": karras,
                            "steps": steps,
                        }
                        case.update(describe(name, sched))
                        cases.append(case)

    # Less common configs: other beta schedules, zero-SNR, PRK warm-up, Euler options.
    extra = [
        ("DDIMScheduler", {}, [10, 50]),
        ("DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2"}, [10]),
        ("DDIMScheduler", dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"), [10]),
        ("DDIMScheduler", dict(SD15, timestep_spacing="linspace", steps_offset=0), [7, 1000]),
        ("PNDMScheduler", dict(SD15, skip_prk_steps=False), [4, 5, 7, 10, 50]),
        ("PNDMScheduler", dict(SD15, skip_prk_steps=False, timestep_spacing="trailing"), [10]),
        ("PNDMScheduler", dict(SD15, timestep_spacing="linspace"), [2, 3]),
        ("PNDMScheduler", {}, [10]),
        ("EulerDiscreteScheduler", {}, [10]),
        ("EulerDiscreteScheduler", dict(SD15, final_sigmas_type="sigma_min"), [10]),
        ("EulerDiscreteScheduler", dict(SD15, interpolation_type="log_linear"), [10]),
        ("EulerDiscreteScheduler", dict(SD15, use_exponential_sigmas=True), [10]),
        ("EulerDiscreteScheduler", dict(SD15, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), [10]),
        ("EulerDiscreteScheduler", dict(SD2V, timestep_type="continuous"), [10]),
        ("EulerDiscreteScheduler", dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"), [10]),
        ("EulerDiscreteScheduler", dict(SD15, beta_schedule="squaredcos_cap_v2"), [10]),
        ("EulerAncestralDiscreteScheduler", dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"), [10]),
        ("EulerAncestralDiscreteScheduler", {}, [10]),
    ]
    for name, config, step_list in extra:
        for steps in step_list:
            sched = make(name, config, steps, False)
            case = {
                "scheduler": name,
                "label": "extra",
                "config": config,
                "use_karras_sigmas": False,
                "steps": steps,
            }
            case.update(describe(name, sched))
            cases.append(case)
    return cases


def alphas_cumprod_cases():
    trained = np.linspace(0.0001, 0.02, 1000).tolist()
    configs = [
        ("DDIMScheduler", {}),
        ("DDIMScheduler", SD15),
        ("DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2"}),
        ("DDIMScheduler", dict(SD15, rescale_betas_zero_snr=True)),
        ("EulerDiscreteScheduler", dict(SD15, rescale_betas_zero_snr=True)),
        ("DDIMScheduler", {"trained_betas": trained}),
    ]
    out = []
    for name, config in configs:
        sched = CLASSES[name].from_config(dict(config))
        out.append({"scheduler": name, "config": config, "alphas_cumprod": f32_list(sched.alphas_cumprod.numpy())})
    return out


def fake_unet(x, t):
    """A deterministic stand-in for the UNet: a simple function of its input and timestep."""
    return x * 0.1 + BASE * (float(t) / 1000.0)


def run_case(name, config, steps, strength, use_karras=False, seed=None):
    sched = make(name, config, steps, use_karras)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = sched.timesteps[t_start * sched.order :]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    latent_timestep = timesteps[:1]
    latents = sched.add_noise(INIT, NOISE, latent_timestep)
    record = {
        "scheduler": name,
        "config": config,
        "use_karras_sigmas": use_karras,
        "steps": steps,
        "strength": strength,
        "t_start": t_start,
        "seed": seed,
        "timesteps": [float(t) for t in timesteps.to(torch.float64).tolist()],
        "init_noise_sigma": scalar(sched.init_noise_sigma),
        "noised": tensor(latents),
        "trajectory": [],
    }
    generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
    for t in timesteps:
        scaled = sched.scale_model_input(latents, t)
        out = fake_unet(scaled, t)
        kwargs = {}
        if name in ("EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "DDIMScheduler"):
            kwargs["generator"] = generator
        latents = sched.step(out, t, latents, return_dict=False, **kwargs)[0]
        step = {"t": float(t), "prev_sample": tensor(latents)}
        if name.startswith("Euler"):
            step["scaled"] = tensor(scaled)
        record["trajectory"].append(step)
    return record


def runs():
    out = []
    strengths = [0.3, 0.75, 1.0]
    for name in CLASSES:
        seed = 1234 if name == "EulerAncestralDiscreteScheduler" else None
        for strength in strengths:
            out.append(run_case(name, SD15, 10, strength, seed=seed))
        for strength in [0.75, 1.0]:
            out.append(run_case(name, dict(SD2V, timestep_spacing="trailing"), 7, strength, seed=seed))
        out.append(run_case(name, dict(SD15, timestep_spacing="leading"), 20, 0.75, seed=seed))
        out.append(run_case(name, dict(SD15, timestep_spacing="linspace"), 7, 1.0, seed=seed))
    out.append(run_case("EulerDiscreteScheduler", SD15, 10, 0.75, use_karras=True))
    out.append(run_case("EulerDiscreteScheduler", SD15, 10, 1.0, use_karras=True))
    out.append(run_case("EulerDiscreteScheduler", dict(SD2V, timestep_type="continuous"), 7, 1.0))
    out.append(run_case("EulerDiscreteScheduler", dict(SD15, prediction_type="sample"), 7, 1.0))
    out.append(run_case("EulerDiscreteScheduler", dict(SD15, final_sigmas_type="sigma_min"), 7, 1.0))
    out.append(run_case("PNDMScheduler", dict(SD15, skip_prk_steps=False), 10, 1.0))
    out.append(run_case("PNDMScheduler", dict(SD15, skip_prk_steps=False), 10, 0.75))
    out.append(run_case("PNDMScheduler", SD15, 1, 1.0))
    out.append(run_case("PNDMScheduler", SD15, 2, 1.0))
    out.append(run_case("DDIMScheduler", dict(SD15, prediction_type="sample", clip_sample=True), 7, 1.0))
    out.append(run_case("DDIMScheduler", dict(SD15, clip_sample=True, clip_sample_range=0.5), 7, 0.75))
    out.append(run_case("DDIMScheduler", dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"), 7, 1.0))
    out.append(run_case("DDIMScheduler", dict(SD15, set_alpha_to_one=True), 7, 1.0))
    out.append(
        run_case(
            "EulerAncestralDiscreteScheduler",
            dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"),
            7,
            1.0,
            seed=1234,
        )
    )
    return out


def main():
    global INIT, NOISE, BASE
    if diffusers.__version__ != "0.42.1":
        print(f"warning: fixtures were designed against diffusers 0.42.1, this is {diffusers.__version__}", file=sys.stderr)
    gen = torch.Generator("cpu").manual_seed(20240607)
    INIT = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    NOISE = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    BASE = torch.randn(SHAPE, generator=gen, dtype=torch.float32)

    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "generator": "scripts/make_scheduler_fixtures.py",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    schedules = {"meta": meta, "alphas_cumprod": alphas_cumprod_cases(), "cases": schedule_cases()}
    with open(OUT / "schedules.json", "w") as f:
        json.dump(schedules, f, separators=(",", ":"))
        f.write("\n")
    run_file = {
        "meta": meta,
        "fake_unet": "model_output = scaled_input * 0.1 + base * (t / 1000)",
        "init": tensor(INIT),
        "noise": tensor(NOISE),
        "base": tensor(BASE),
        "runs": runs(),
    }
    with open(OUT / "runs.json", "w") as f:
        json.dump(run_file, f, separators=(",", ":"))
        f.write("\n")
    for p in sorted(OUT.iterdir()):
        print(f"{p}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
