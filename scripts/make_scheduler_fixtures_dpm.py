"""Writes the reference fixtures for Pictor's exponential-integrator schedulers from diffusers:
DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler
(crates/engine/src/schedulers/{dpmsolver_multistep,dpmsolver_singlestep,unipc,deis}.rs).

Run by hand (never by CI) from the repository root, with the venv that has torch and diffusers:

    /work/venv/bin/python scripts/make_scheduler_fixtures_dpm.py

It rewrites tests/fixtures/schedulers/dpm_schedules.json and tests/fixtures/schedulers/dpm_runs.json.

Schedules: timesteps (integers) and sigmas (float32 as hex) after from_config + set_timesteps for SD 1.5-like
(epsilon) and SD 2-like (v_prediction) configs, every spacing, step counts 1, 2, 3, 7, 10, 20, 50, with and
without Karras sigmas. Runs: StableDiffusionImg2ImgPipeline-shaped loops (t_start slicing, set_begin_index,
add_noise, step) with the same fake UNet as scripts/make_scheduler_fixtures.py and a seeded generator for the
SDE variants. Tensors are {"shape": [...], "f32le": "<hex of little-endian float32>"}.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    UniPCMultistepScheduler,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "schedulers"

CLASSES = {
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "DPMSolverSinglestepScheduler": DPMSolverSinglestepScheduler,
    "UniPCMultistepScheduler": UniPCMultistepScheduler,
    "DEISMultistepScheduler": DEISMultistepScheduler,
}

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


def hex32(values):
    return np.asarray(values, dtype="<f4").reshape(-1).tobytes().hex()


def tensor(t):
    t = t.detach().to(torch.float32).contiguous()
    return {"shape": list(t.shape), "f32le": hex32(t.numpy())}


def make(name, config, steps, karras=None, algorithm=None):
    kwargs = {}
    if karras is not None:
        kwargs["use_karras_sigmas"] = karras
    if algorithm is not None:
        kwargs["algorithm_type"] = algorithm
    sched = CLASSES[name].from_config(dict(config), **kwargs)
    sched.set_timesteps(steps)
    return sched


def schedule_cases():
    cases = []
    for name in CLASSES:
        spacings = [None] if name == "DPMSolverSinglestepScheduler" else [None, "leading", "linspace", "trailing"]
        for cfg_name, cfg in {"sd15": SD15, "sd2v": SD2V}.items():
            for spacing in spacings:
                config = dict(cfg)
                if spacing is not None:
                    config["timestep_spacing"] = spacing
                for steps in [1, 2, 3, 7, 10, 20, 50]:
                    for karras in [False, True]:
                        sched = make(name, config, steps, karras=True if karras else None)
                        cases.append(
                            {
                                "scheduler": name,
                                "config": config,
                                "use_karras_sigmas": karras,
                                "steps": steps,
                                "timesteps": [int(t) for t in sched.timesteps.tolist()],
                                "sigmas": hex32(sched.sigmas.numpy()),
                            }
                        )
    extra = [
        ("DPMSolverMultistepScheduler", dict(SD15, final_sigmas_type="sigma_min"), [10]),
        ("DPMSolverMultistepScheduler", dict(SD15, use_lu_lambdas=True), [10, 25]),
        ("DPMSolverMultistepScheduler", dict(SD15, use_exponential_sigmas=True), [10]),
        ("DPMSolverMultistepScheduler", dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"), [10]),
        ("DPMSolverMultistepScheduler", dict(SD15, lambda_min_clipped=-5.1), [10]),
        ("DPMSolverMultistepScheduler", dict(SD15, beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True), [10]),
        ("DPMSolverMultistepScheduler", {}, [10]),
        ("DPMSolverSinglestepScheduler", dict(SD15, final_sigmas_type="sigma_min"), [10]),
        ("DPMSolverSinglestepScheduler", dict(SD15, lambda_min_clipped=-5.1), [10]),
        ("DPMSolverSinglestepScheduler", dict(SD15, use_exponential_sigmas=True), [10]),
        ("UniPCMultistepScheduler", dict(SD15, final_sigmas_type="sigma_min"), [10]),
        ("UniPCMultistepScheduler", dict(SD15, final_sigmas_type="sigma_min", use_karras_sigmas=True), [10]),
        ("UniPCMultistepScheduler", dict(SD15, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), [10]),
        ("UniPCMultistepScheduler", dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"), [10]),
        ("DEISMultistepScheduler", dict(SD15, use_exponential_sigmas=True), [10]),
        ("DEISMultistepScheduler", {}, [10]),
    ]
    for name, config, step_list in extra:
        for steps in step_list:
            sched = make(name, config, steps)
            cases.append(
                {
                    "scheduler": name,
                    "config": config,
                    "use_karras_sigmas": False,
                    "steps": steps,
                    "timesteps": [int(t) for t in sched.timesteps.tolist()],
                    "sigmas": hex32(sched.sigmas.numpy()),
                }
            )
    return cases


def fake_unet(x, t):
    return x * 0.1 + BASE * (float(t) / 1000.0)


def run_case(name, config, steps, strength, karras=False, algorithm=None, seed=None):
    sched = make(name, config, steps, karras=True if karras else None, algorithm=algorithm)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = sched.timesteps[t_start * sched.order :]
    sched.set_begin_index(t_start * sched.order)
    latents = sched.add_noise(INIT, NOISE, timesteps[:1])
    record = {
        "scheduler": name,
        "config": config,
        "use_karras_sigmas": karras,
        "algorithm_type": algorithm,
        "steps": steps,
        "strength": strength,
        "t_start": t_start,
        "seed": seed,
        "timesteps": [int(t) for t in timesteps.tolist()],
        "noised": tensor(latents),
        "trajectory": [],
    }
    generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
    for t in timesteps:
        scaled = sched.scale_model_input(latents, t)
        out = fake_unet(scaled, t)
        kwargs = {"generator": generator} if "DPMSolver" in name else {}
        latents = sched.step(out, t, latents, return_dict=False, **kwargs)[0]
        record["trajectory"].append(tensor(latents))
    return record


def runs():
    out = []
    trailing_v = dict(SD2V, timestep_spacing="trailing")
    for name in CLASSES:
        for order in [1, 2, 3]:
            cfg = dict(SD15, solver_order=order)
            for strength in [0.3, 0.75, 1.0]:
                out.append(run_case(name, cfg, 10, strength))
            out.append(run_case(name, dict(trailing_v, solver_order=order), 7, 0.75))
        out.append(run_case(name, trailing_v, 7, 1.0))
        out.append(run_case(name, SD15, 10, 0.75, karras=True))
        out.append(run_case(name, dict(SD2V, solver_order=3), 20, 1.0, karras=True))
        out.append(run_case(name, dict(SD15, timestep_spacing="leading"), 20, 0.75))
        out.append(run_case(name, SD15, 1, 1.0))
        out.append(run_case(name, SD15, 3, 1.0))
        out.append(run_case(name, dict(SD15, solver_order=3), 16, 1.0))
        out.append(run_case(name, dict(SD15, prediction_type="sample"), 7, 1.0))
    # Singlestep strength edge cases (img2img starting inside an order group, odd counts; #1866).
    for steps, strength in [(5, 0.3), (5, 0.5), (7, 0.45), (9, 0.6), (3, 0.7), (2, 0.5)]:
        for order in [2, 3]:
            out.append(run_case("DPMSolverSinglestepScheduler", dict(SD15, solver_order=order), steps, strength))
    out.append(run_case("DPMSolverSinglestepScheduler", dict(SD15, lower_order_final=False, final_sigmas_type="sigma_min"), 10, 1.0))
    out.append(run_case("DPMSolverSinglestepScheduler", dict(SD15, solver_order=3, solver_type="heun", lower_order_final=False, final_sigmas_type="sigma_min"), 12, 1.0))
    out.append(run_case("DPMSolverSinglestepScheduler", dict(SD15, solver_order=3, solver_type="heun"), 10, 1.0))
    out.append(run_case("DPMSolverSinglestepScheduler", dict(SD15, algorithm_type="sde-dpmsolver++"), 10, 0.75, seed=77))
    out.append(run_case("DPMSolverSinglestepScheduler", dict(SD15, algorithm_type="sde-dpmsolver++", solver_order=3), 9, 1.0, seed=77))
    # DPM-Solver multistep options.
    dpm = "DPMSolverMultistepScheduler"
    for order in [1, 2, 3]:
        out.append(run_case(dpm, dict(SD15, solver_order=order), 10, 0.75, algorithm="sde-dpmsolver++", seed=1234))
        out.append(run_case(dpm, dict(trailing_v, solver_order=order), 7, 1.0, algorithm="sde-dpmsolver++", seed=99))
    out.append(run_case(dpm, SD15, 10, 1.0, karras=True, algorithm="sde-dpmsolver++", seed=5))
    out.append(run_case(dpm, dict(SD15, algorithm_type="sde-dpmsolver++", solver_type="heun"), 10, 1.0, seed=6))
    out.append(run_case(dpm, dict(SD15, solver_type="heun"), 10, 1.0))
    out.append(run_case(dpm, dict(SD15, euler_at_final=True, final_sigmas_type="sigma_min"), 10, 1.0))
    out.append(run_case(dpm, dict(SD15, final_sigmas_type="sigma_min"), 20, 1.0))
    out.append(run_case(dpm, dict(SD15, lower_order_final=False, final_sigmas_type="sigma_min", solver_order=3), 10, 1.0))
    out.append(run_case(dpm, dict(SD15, use_lu_lambdas=True), 10, 1.0))
    out.append(run_case(dpm, dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10, 1.0))
    out.append(run_case(dpm, dict(SD15, lambda_min_clipped=-5.1), 10, 0.75))
    # UniPC options.
    uni = "UniPCMultistepScheduler"
    out.append(run_case(uni, dict(SD15, solver_type="bh1"), 10, 1.0))
    out.append(run_case(uni, dict(SD15, solver_type="bh1", solver_order=3), 10, 0.75))
    out.append(run_case(uni, dict(SD15, predict_x0=False), 10, 1.0))
    out.append(run_case(uni, dict(SD2V, predict_x0=False, solver_order=3), 10, 1.0))
    out.append(run_case(uni, dict(SD15, disable_corrector=[0, 3]), 10, 1.0))
    out.append(run_case(uni, dict(SD15, lower_order_final=False, final_sigmas_type="sigma_min"), 10, 1.0))
    out.append(run_case(uni, dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10, 1.0))
    # DEIS with exponential sigmas (the final step repeats the last sigma).
    out.append(run_case("DEISMultistepScheduler", dict(SD15, use_exponential_sigmas=True), 10, 1.0))
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
        "generator": "scripts/make_scheduler_fixtures_dpm.py",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    with open(OUT / "dpm_schedules.json", "w") as f:
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
    with open(OUT / "dpm_runs.json", "w") as f:
        json.dump(run_file, f, separators=(",", ":"))
        f.write("\n")
    for p in sorted(OUT.glob("dpm_*.json")):
        print(f"{p}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
