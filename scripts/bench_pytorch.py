#!/usr/bin/env python3
"""CPU benchmark of SD 1.5 in PyTorch/diffusers, measured the way `pictor bench` measures Pictor.

Pictor's side is `pictor bench` (crates/engine/src/bench.rs): it builds the full-size SD 1.5 networks with
random weights, runs one warm-up call, times `--iterations` calls and reports the median seconds and the
process's peak resident memory (VmHWM). This script does the same in diffusers/transformers, and with
`--compare BIN` also runs `BIN bench ... --json` with the same arguments and puts both side by side.

Usage (from the repository root, with the project venv):

    # one measurement, PyTorch only
    /work/venv/bin/python scripts/bench_pytorch.py --component unet --resolution 512 --batch 2 --iterations 3
    /work/venv/bin/python scripts/bench_pytorch.py --component vae-decode --resolution 512 --batch 1
    /work/venv/bin/python scripts/bench_pytorch.py --component img2img --resolution 512 --batch 1 --steps 20

    # the same, plus Pictor, in one table
    /work/venv/bin/python scripts/bench_pytorch.py --component unet --compare target/release/pictor

    # the issue's set (below), both sides, machine-readable
    /work/venv/bin/python scripts/bench_pytorch.py --suite --compare target/release/pictor --json

Options (the same names and defaults as `pictor bench`):
    --component unet|vae-encode|vae-decode|text-encoder|img2img   (default unet)
    --resolution N   image side in pixels, a multiple of 8 (default 512); latents are N/8
    --batch N        batch size; img2img: images per request (num_images_per_prompt) (default 2)
    --iterations N   timed runs after one warm-up run (default 3)
    --precision fp32|bf16   (default fp32)
    --tomesd         token merging: tomesd.apply_patch(unet, ratio=0.5) (tomesd's other defaults)
    --steps N        img2img: steps of the full schedule; strength 0.75 runs 3/4 of them (default 20)
    --suite          run the issue's set instead of one measurement (--precision, --tomesd and
                     --iterations apply to all of it):
                       UNet step (batch 2) at 256 and 512, VAE encode and decode (batch 1) at 256 and 512,
                       text encoder (batch 2), img2img 512 x 512, 20 steps, strength 0.75, one image
    --pictor-precision fp32|bf16   Pictor's precision when it should differ from --precision (the issue's
                     bf16 goal: `--precision fp32 --pictor-precision bf16` puts Pictor bf16 next to PyTorch fp32)
    --compare BIN    also run `BIN bench <same arguments> --json` for each measurement (Pictor must be
                     built beforehand, e.g. `cargo build --release -p pictor-cli`); if BIN is missing or
                     fails, the table says so in Pictor's column and the error is printed below it
    --timeout S      give up on one measurement (either side) after S seconds (default: no limit)
    --json           print one JSON object (machine, versions, and a list of rows) instead of the table

What each component times, per call (inputs drawn once, before the warm-up):
    unet          UNet2DConditionModel(latents [batch, 4, N/8, N/8], timestep 500, context [batch, 77, 768])
    vae-encode    AutoencoderKL.encode(images [batch, 3, N, N] ~ N(0, 0.5^2)).latent_dist (no sampling)
    vae-decode    AutoencoderKL.decode(latents [batch, 4, N/8, N/8] ~ N(0, 1))
    text-encoder  CLIPTextModel(ids [batch, 77]) with ids[i] = i * 7919 mod 49408, always in fp32 (Pictor
                  runs its text encoder in fp32 whatever --precision says; so does this script)
    img2img       StableDiffusionImg2ImgPipeline("a photo of a cat", negative prompt "", an N x N gradient
                  image, strength 0.75, guidance 7.5, PNDM as SD 1.5 ships it, seed 0,
                  num_images_per_prompt=batch, PIL output); the tokenizer is CLIPTokenizer from
                  assets/clip-tokenizer/, the safety checker is None

The networks are SD 1.5's (the configs of `sd15_unet_config`, `sd15_vae_config`, `clip_l_config` in
crates/engine/src/bench.rs, repeated below) with random weights drawn the way Pictor draws them: every
parameter with two or more dimensions N(0, 1/fan_in) (fan_in = product of all but the first dimension),
or N(0, 0.5^2) if its name contains "embedding"; biases zero; other one-dimensional parameters one.
The models are in eval mode and every call runs under torch.inference_mode().

How it measures:
    - Each measurement runs in a fresh subprocess of this script (`--worker`), so that VmHWM, which is per
      process, belongs to that measurement alone. Peak memory is VmHWM from /proc/self/status at the end
      of the run, in MiB, exactly as Pictor reads it. It includes the Python interpreter and the torch /
      diffusers imports; the row also gives `baseline_rss_mib`, the VmHWM after the imports and before
      any model is built, so `peak - baseline` is what the measurement itself added.
    - torch uses all cores: torch.set_num_threads(os.cpu_count()) (the thread count is in the output).
    - Time is time.perf_counter() around each call; median of the timed runs (mean of the two middle ones
      for an even count), as Pictor computes it.

Differences from Pictor that remain (timings are comparable, not bit-identical work):
    - Attention runs through diffusers' default processor (torch scaled_dot_product_attention).
    - img2img in bf16: diffusers casts the prompt embeddings to the text encoder's dtype and the init
      image to that dtype too, so the whole pipeline, text encoder included, runs in bf16; Pictor keeps
      its text encoder in fp32 and casts the embeddings. (The text encoder is a small part of img2img.)
    - tomesd draws its random merge destinations from its own generator; Pictor seeds its own. Which
      tokens merge differs; how many does not.
    - Peak memory on the PyTorch side includes the Python/torch runtime (see baseline_rss_mib).

Not run by CI. Running the whole suite at 512 takes many minutes and several GB of memory per side.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_ASSETS = ROOT / "assets" / "clip-tokenizer"
COMPONENTS = ["unet", "vae-encode", "vae-decode", "text-encoder", "img2img"]

# SD 1.5's unet/config.json (the keys that shape the network), as in crates/engine/src/bench.rs.
SD15_UNET = dict(
    in_channels=4, out_channels=4,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
    norm_num_groups=32, sample_size=64,
)
# SD 1.5's vae/config.json.
SD15_VAE = dict(
    in_channels=3, out_channels=3,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2, latent_channels=4, norm_num_groups=32,
    scaling_factor=0.18215, sample_size=512,
)
# CLIP ViT-L/14's text tower.
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
# SD 1.5's scheduler/scheduler_config.json, as Pictor's random model uses it.
SD15_PNDM = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
)


# ----------------------------------------------------------------------------------------------------------
# Worker: one measurement, in this process.


def vm_hwm_mib():
    """Peak resident set size of this process (VmHWM) in MiB, or None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def median(times):
    t = sorted(times)
    n = len(t)
    return t[n // 2] if n % 2 else (t[n // 2 - 1] + t[n // 2]) / 2.0


def randomize(model, torch):
    """Pictor's random weights: N(0, 1/fan_in) (N(0, 0.25) for embeddings), zero biases, unit scales."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = 1
                for d in p.shape[1:]:
                    fan_in *= d
                std = 0.5 if "embedding" in name else fan_in ** -0.5
                p.normal_(0.0, std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model.eval()


def build(make, dtype, torch):
    """Builds `make()` with its parameters created in `dtype` (no float32 copy first, so a bf16 model's
    peak memory is that of bf16 weights, as in Pictor), then draws Pictor's random weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = make()
    finally:
        torch.set_default_dtype(previous)
    return randomize(model, torch).to(dtype)


def build_unet(dtype, torch):
    from diffusers import UNet2DConditionModel

    return build(lambda: UNet2DConditionModel(**SD15_UNET), dtype, torch)


def build_vae(dtype, torch):
    from diffusers import AutoencoderKL

    return build(lambda: AutoencoderKL(**SD15_VAE), dtype, torch)


def build_text_encoder(dtype, torch):
    from transformers import CLIPTextConfig, CLIPTextModel

    return build(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)), dtype, torch)


def gradient_image(side):
    """The init image Pictor's img2img benchmark uses: (x mod 256, y mod 256, (x + y) mod 256)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def make_run(opts, torch):
    """Builds the networks and inputs of `opts` and returns (the call to time, what it ran in)."""
    dtype = torch.bfloat16 if opts.precision == "bf16" else torch.float32
    b, res = opts.batch, opts.resolution
    if opts.component == "unet":
        unet = build_unet(dtype, torch)
        if opts.tomesd:
            import tomesd

            tomesd.apply_patch(unet, ratio=0.5)
        latents = torch.randn(b, 4, res // 8, res // 8).to(dtype)
        context = torch.randn(b, 77, 768).to(dtype)
        return (lambda: unet(latents, 500, encoder_hidden_states=context, return_dict=False)), str(dtype)
    if opts.component in ("vae-encode", "vae-decode"):
        vae = build_vae(dtype, torch)
        if opts.component == "vae-encode":
            images = (torch.randn(b, 3, res, res) * 0.5).to(dtype)
            return (lambda: vae.encode(images).latent_dist), str(dtype)
        latents = torch.randn(b, 4, res // 8, res // 8).to(dtype)
        return (lambda: vae.decode(latents).sample), str(dtype)
    if opts.component == "text-encoder":
        # Pictor runs the text encoder in fp32 whatever the precision.
        text = build_text_encoder(torch.float32, torch)
        ids = torch.tensor([(i * 7919) % 49408 for i in range(b * 77)], dtype=torch.long).reshape(b, 77)
        return (lambda: text(input_ids=ids)), str(torch.float32)
    if opts.component == "img2img":
        from diffusers import PNDMScheduler, StableDiffusionImg2ImgPipeline
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(
            TOKENIZER_ASSETS, pad_token="<|endoftext|>", model_max_length=77
        )
        pipe = StableDiffusionImg2ImgPipeline(
            vae=build_vae(dtype, torch),
            text_encoder=build_text_encoder(dtype, torch),
            tokenizer=tokenizer,
            unet=build_unet(dtype, torch),
            scheduler=PNDMScheduler.from_config(SD15_PNDM),  # ignores clip_sample, as diffusers does
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        if opts.tomesd:
            import tomesd

            tomesd.apply_patch(pipe, ratio=0.5)
        init = gradient_image(res)

        def run():
            return pipe(
                prompt="a photo of a cat",
                negative_prompt="",
                image=init,
                strength=0.75,
                num_inference_steps=opts.steps,
                guidance_scale=7.5,
                num_images_per_prompt=b,
                generator=torch.Generator().manual_seed(0),
                output_type="pil",
            )

        return run, str(dtype)
    raise ValueError(f"unknown component {opts.component!r}")


def worker(opts):
    """Runs one measurement in this process and prints its result as one JSON line."""
    import torch
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    baseline = vm_hwm_mib()
    run, ran_in = make_run(opts, torch)
    with torch.inference_mode():
        run()
        times = []
        for _ in range(opts.iterations):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "times_s": times,
        "median_s": median(times),
        "peak_rss_mib": vm_hwm_mib(),
        "baseline_rss_mib": baseline,
        "torch_threads": torch.get_num_threads(),
        "dtype": ran_in,
    }))


# ----------------------------------------------------------------------------------------------------------
# Driver: one subprocess per measurement, optional Pictor run, the table.


def measurement_args(m):
    """The command-line arguments of measurement `m`, shared by this script's worker and `pictor bench`."""
    args = [
        "--component", m["component"], "--resolution", str(m["resolution"]), "--batch", str(m["batch"]),
        "--iterations", str(m["iterations"]), "--precision", m["precision"], "--steps", str(m["steps"]),
    ]
    if m["tomesd"]:
        args.append("--tomesd")
    return args


def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON object in its output")


def run_side(cmd, timeout):
    """Runs `cmd`, returns (its JSON result, None) or (None, what went wrong)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return None, f"{cmd[0]}: not found"
    except PermissionError:
        return None, f"{cmd[0]}: not executable"
    except OSError as e:
        return None, f"{cmd[0]}: {e}"
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return None, f"exit status {done.returncode}: {tail or '(no output)'}"
    try:
        return last_json_line(done.stdout), None
    except ValueError as e:
        return None, f"unreadable output ({e}): {done.stdout.strip()[-200:]!r}"


def suite(opts):
    common = dict(iterations=opts.iterations, precision=opts.precision, tomesd=opts.tomesd, steps=opts.steps)
    rows = []
    for res in (256, 512):
        rows.append(dict(common, component="unet", resolution=res, batch=2))
    for comp in ("vae-encode", "vae-decode"):
        for res in (256, 512):
            rows.append(dict(common, component=comp, resolution=res, batch=1))
    rows.append(dict(common, component="text-encoder", resolution=512, batch=2))
    rows.append(dict(common, component="img2img", resolution=512, batch=1, steps=20))
    return rows


def machine():
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.TimeoutExpired):
        pass

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": version("torch"),
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "tomesd": version("tomesd"),
    }


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(info, rows, compare):
    print(f"Machine: {info['cpu']}, {info['cores']} cores; {info['date']}")
    print(f"PyTorch side: torch {info['torch']}, diffusers {info['diffusers']}, transformers {info['transformers']}"
          f", tomesd {info['tomesd']}; torch threads = os.cpu_count() = {info['cores']}; each measurement"
          " in a fresh process, peak = VmHWM (baseline = VmHWM after the imports)")
    head = ["component", "res", "batch", "prec", "tome", "iters", "PyTorch s", "Pictor s", "Pictor/PyTorch",
            "PyTorch peak MiB", "(baseline)", "Pictor peak MiB"]
    if not compare:
        head = [h for h in head if not h.startswith("Pictor")]
    lines = []
    errors = []
    for r in rows:
        pt, pc = r.get("pytorch"), r.get("pictor")
        cells = [
            r["component"] + (f" ({r['steps']} steps)" if r["component"] == "img2img" else ""),
            str(r["resolution"]), str(r["batch"]), r["precision"], "yes" if r["tomesd"] else "no",
            str(r["iterations"]),
            fmt(pt and pt["median_s"], ".3f") if pt else "error",
        ]
        if compare:
            cells.append((fmt(pc["median_s"], ".3f") if pc else "error")
                         + (f" ({r['pictor_precision']})" if r.get("pictor_precision") != r["precision"] else ""))
            ratio = pc["median_s"] / pt["median_s"] if pt and pc and pt["median_s"] > 0 else None
            cells.append(fmt(ratio, ".2f"))
        cells.append(fmt(pt and pt.get("peak_rss_mib"), ".0f") if pt else "error")
        cells.append(fmt(pt and pt.get("baseline_rss_mib"), ".0f") if pt else "-")
        if compare:
            cells.append(fmt(pc.get("peak_rss_mib"), ".0f") if pc else "error")
        lines.append(cells)
        for side in ("pytorch", "pictor"):
            if r.get(f"{side}_error"):
                errors.append(f"{r['component']} {r['resolution']} batch {r['batch']}, {side}: {r[side + '_error']}")
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for cells in lines:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    for e in errors:
        print(f"error: {e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                epilog="See the module docstring (the top of this file) for details.")
    p.add_argument("--component", choices=COMPONENTS, default="unet")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--tomesd", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--suite", action="store_true", help="run the issue's set of measurements")
    p.add_argument("--compare", metavar="BIN", help="also run BIN bench ... --json (the pictor binary)")
    p.add_argument("--pictor-precision", choices=["fp32", "bf16"], default=None,
                   help="Pictor's precision when it differs from --precision (bf16 against PyTorch fp32)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per measurement and side")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.resolution <= 0 or opts.resolution % 8:
        p.error("--resolution must be a positive multiple of 8")
    if opts.batch < 1 or opts.iterations < 1 or opts.steps < 1:
        p.error("--batch, --iterations and --steps must be at least 1")
    if opts.worker:
        worker(opts)
        return

    if opts.suite:
        measurements = suite(opts)
    else:
        measurements = [dict(component=opts.component, resolution=opts.resolution, batch=opts.batch,
                             iterations=opts.iterations, precision=opts.precision, tomesd=opts.tomesd,
                             steps=opts.steps)]
    compare = None
    if opts.compare:
        compare = str(Path(opts.compare).resolve()) if os.sep in opts.compare else opts.compare
    info = machine()
    rows = []
    for m in measurements:
        args = measurement_args(m)
        if not opts.json:
            print(f"running {' '.join(args)} ...", file=sys.stderr, flush=True)
        row = dict(m)
        row["pytorch"], row["pytorch_error"] = run_side(
            [sys.executable, str(Path(__file__).resolve()), "--worker", *args], opts.timeout)
        if compare:
            pictor_args = measurement_args(dict(m, precision=opts.pictor_precision or m["precision"]))
            row["pictor_precision"] = opts.pictor_precision or m["precision"]
            row["pictor"], row["pictor_error"] = run_side([compare, "bench", *pictor_args, "--json"],
                                                          opts.timeout)
        rows.append(row)
        if not opts.json:
            # Each result as soon as it is known, so an interrupted suite keeps what it measured.
            pt, pc = row.get("pytorch"), row.get("pictor")
            done = (f"  PyTorch {fmt(pt and pt['median_s'], '.3f')} s, peak "
                    f"{fmt(pt and pt.get('peak_rss_mib'), '.0f')} MiB")
            if compare:
                done += (f"; Pictor ({row['pictor_precision']}) {fmt(pc and pc['median_s'], '.3f')} s, peak "
                         f"{fmt(pc and pc.get('peak_rss_mib'), '.0f')} MiB")
                if pt and pc and pt["median_s"] > 0:
                    done += f"; ratio {pc['median_s'] / pt['median_s']:.2f}"
            print(done, file=sys.stderr, flush=True)
    if opts.json:
        print(json.dumps({"machine": info, "compare": compare, "rows": rows}, indent=2, sort_keys=True))
    else:
        print_table(info, rows, compare)
    failed = any(r.get("pytorch_error") or r.get("pictor_error") for r in rows)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
