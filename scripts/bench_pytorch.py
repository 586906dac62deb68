#!/usr/bin/env python3
"""CPU benchmark of SD 1.5 or SDXL in PyTorch/diffusers, measured the way `pictor bench` measures Pictor.

Pictor's side is `pictor bench` (crates/engine/src/bench.rs): it builds the full-size SD 1.5 networks with
random weights, runs one warm-up call, times `--iterations` calls and reports the median seconds and the
process's peak resident memory (VmHWM). This script does the same in diffusers/transformers, and with
`--compare BIN` also runs `BIN bench ... --json` with the same arguments and puts both side by side.
With `--openvino` it also times the same networks compiled by OpenVINO's CPU plugin (a third column), and
`--isa avx2` holds every side to AVX2 (see "Instruction set" below).

Usage (from the repository root, with the project venv):

    # one measurement, PyTorch only
    /work/venv/bin/python scripts/bench_pytorch.py --component unet --resolution 512 --batch 2 --iterations 3
    /work/venv/bin/python scripts/bench_pytorch.py --component vae-decode --resolution 512 --batch 1
    /work/venv/bin/python scripts/bench_pytorch.py --component img2img --resolution 512 --batch 1 --steps 20

    # the same, plus Pictor, in one table
    /work/venv/bin/python scripts/bench_pytorch.py --component unet --compare target/release/pictor

    # the issue's set (below), both sides, machine-readable
    /work/venv/bin/python scripts/bench_pytorch.py --suite --compare target/release/pictor --json

    # SDXL base at 1024 x 1024 (UNet step batch 2, VAE encode/decode, both text encoders), both sides
    /work/venv/bin/python scripts/bench_pytorch.py --arch sdxl --suite --compare target/release/pictor

    # plus OpenVINO, every side restricted to AVX2
    /work/venv/bin/python scripts/bench_pytorch.py --suite --compare target/release/pictor --openvino --isa avx2

    # on a CUDA GPU in float16 (Pictor built with --features cuda), as scripts/gpu_check.sh --run does
    python3 scripts/bench_pytorch.py --device cuda --precision fp16 --component unet --iterations 10 \
        --compare target/cuda/release/pictor

Options (the same names and defaults as `pictor bench`):
    --arch sd15|sdxl   which model's full-size networks (default sd15); sdxl: the SDXL base's UNet (text_time
                     add embedding: pooled [batch, 1280] ~ N(0, 1) and time ids (N, N, 0, 0, N, N)), its VAE,
                     and as "text-encoder" both encoders (CLIP-L and OpenCLIP-bigG with projection, every
                     layer); img2img: StableDiffusionXLImg2ImgPipeline with Euler as SDXL ships it. No
                     OpenVINO side for sdxl.
    --component unet|vae-encode|vae-decode|text-encoder|img2img   (default unet)
    --resolution N   image side in pixels, a multiple of 8 (default 512); latents are N/8
    --batch N        batch size; img2img: images per request (num_images_per_prompt) (default 2)
    --iterations N   timed runs after one warm-up run (default 3)
    --precision fp32|bf16|fp16   (default fp32); fp16: every network in torch.float16 (the text encoder
                     too in img2img, as a diffusers pipeline loaded with torch_dtype=float16 runs; Pictor
                     keeps its text encoder in fp32), the GPU's precision
    --device cpu|cuda   where PyTorch runs (default cpu; cuda: GPU 0) and, with --compare, Pictor (`pictor
                     bench --device`); on cuda each timed call ends with torch.cuda.synchronize(), the row
                     also gives the GPU's name and torch.cuda.max_memory_allocated() as `peak_gpu_mib`,
                     and there is no OpenVINO side
    --tomesd         token merging: tomesd.apply_patch(unet, ratio=0.5) (tomesd's other defaults)
    --steps N        img2img: steps of the full schedule; strength 0.75 runs 3/4 of them (default 20)
    --suite          run the issue's set instead of one measurement (--precision, --tomesd and
                     --iterations apply to all of it):
                       sd15: UNet step (batch 2) at 256 and 512, VAE encode and decode (batch 1) at 256 and
                       512, text encoder (batch 2), img2img 512 x 512, 20 steps, strength 0.75, one image
                       sdxl: UNet step (batch 2), VAE encode and decode (batch 1) at 1024, text encoders
                       (batch 2)
    --pictor-precision fp32|bf16|fp16   Pictor's precision when it should differ from --precision (the issue's
                     bf16 goal: `--precision fp32 --pictor-precision bf16` puts Pictor bf16 next to PyTorch fp32)
    --compare BIN    also run `BIN bench <same arguments> --json` for each measurement (Pictor must be
                     built beforehand, e.g. `cargo build --release -p pictor-cli`); if BIN is missing or
                     fails, the table says so in Pictor's column and the error is printed below it
    --openvino       also time OpenVINO (components unet, vae-encode, vae-decode, text-encoder; see below);
                     adds the columns "OpenVINO s", "Pictor/OpenVINO" (with --compare) and "OpenVINO peak MiB"
    --openvino-cache DIR   where the converted OpenVINO IR is kept and reused
                     (default target/openvino-cache/, one folder per component, resolution and batch)
    --isa native|avx2   native (default): every side runs at the best instruction set it finds; avx2: every
                     measured process gets the environment variables below that hold it to AVX2
    --timeout S      give up on one measurement (any side) after S seconds (default: no limit); the
                     OpenVINO conversion gets the same limit of its own
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

OpenVINO column (--openvino):
    What is converted: the same networks as above, built by the same functions with the same random weights
    (always fp32, seed 0), each wrapped in a small torch.nn.Module whose forward returns exactly what the
    PyTorch side computes per call:
        unet          unet(latents, 500, encoder_hidden_states=context)[0], the noise prediction; the
                      timestep 500 is a constant of the graph (inputs: latents, context)
        vae-encode    vae._encode(images): encoder + quant_conv, i.e. the latent distribution's parameters
                      (`moments`, mean and logvar, [batch, 8, N/8, N/8]) that latent_dist is made of
        vae-decode    vae.decode(latents).sample: post_quant_conv + decoder
        text-encoder  text_encoder(input_ids=ids).last_hidden_state
    img2img has no OpenVINO side (a whole diffusers pipeline; its cell is "-"), and neither has --tomesd
    (token merging is a PyTorch patch); with --precision bf16 OpenVINO still runs fp32 (the cell says so).
    Two steps, each in its own process, so that neither the conversion's time nor its memory (torch, the
    traced model) is part of the measurement:
        1. convert: openvino.convert_model(wrapper, example_input=<the inputs below, as torch tensors>),
           reshaped to those static shapes, openvino.save_model(ov_model, <cache>/model.xml,
           compress_to_fp16=False); the folder is reused while its meta.json matches the component, the
           shapes and the openvino/torch/diffusers/transformers versions (delete it to force a new one).
        2. measure (`--worker --runtime openvino`): imports openvino and numpy only, core.read_model(IR),
           core.compile_model(model, "CPU", {INFERENCE_NUM_THREADS: os.cpu_count(), PERFORMANCE_HINT:
           LATENCY, INFERENCE_PRECISION_HINT: f32}) (the keys and values of openvino.properties; the
           compiled model's own values are read back into the JSON as `compiled`), one warm-up inference,
           then `--iterations` timed synchronous InferRequest.infer() calls (inputs shared, not copied);
           median as above. Peak = VmHWM at the end. It includes the IR's weights as read (the .bin is
           memory-mapped, and the compiled model keeps those pages resident next to the copies the plugin
           repacks, so peak is about twice the weights; `rss_file_mib` / `rss_anon_mib` in the JSON split
           the resident set at the end); `baseline_rss_mib` is the VmHWM after `import openvino`. Reading
           and compiling are not timed (`read_s`, `compile_s` in the JSON).
    Inputs of the OpenVINO worker: numpy default_rng(0) draws of the PyTorch side's shapes and spreads
    (latents N(0, 1), context N(0, 1), images N(0, 0.5^2)); the token ids are the same as PyTorch's.
    The JSON row also lists the executed kernels (`primitive_types`, from the runtime model's rt_info
    'primitiveType') and counts them by the ISA their names carry (`kernel_isas`).

Instruction set (--isa avx2): the environment each measured process gets.
    PyTorch   ATEN_CPU_CAPABILITY=avx2 (ATen's vectorized kernels), ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN: the
              convolutions), MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL's sgemm: the Linear layers). The worker
              reports torch.backends.cpu.get_cpu_capability() as `cpu_capability` (table header).
              (MKL's switch could not be checked on the AMD machine this was written on, where MKL's
              sgemm showed no AVX-512 speed to begin with; ATen's and oneDNN's were: cpu_capability AVX2,
              oneDNN's verbose log "isa:Intel AVX2", jit:avx2 convolutions.)
    Pictor    PICTOR_CPU=avx2; `pictor bench --json` reports the tier it ran at (`cpu_tier`, the "Pictor
              tier" column).
    OpenVINO  OV_CPU_MAX_ISA=AVX2 (read by libopenvino's CPU detection: the plugin's own JIT kernels, e.g.
              MVN, i.e. GroupNorm/LayerNorm) and ONEDNN_MAX_CPU_ISA=AVX2 (read by the plugin's oneDNN:
              convolutions, eltwise, the fused "Subgraph" kernels that include attention, the FullyConnected
              layers on brgemm); each alone leaves the other's kernels at AVX-512 (checked with openvino
              2026.4 through the runtime model's kernel names, e.g. MVN jit_avx512_f32 -> jit_avx2_f32,
              Convolution brgconv_avx512_f32 -> brgconv_avx2_f32, and a 3x3 convolution that runs 2x
              slower). Not restricted by anything found: the FullyConnected layers (Linear with constant
              weights) that run on MLAS (`gemm_mlas_f32`; 128 of the UNet's 160, 60 of the text encoder's
              72), which picks its kernels from CPUID; their timing does not change under the switches.
              The table header counts the executed kernels by the ISA in their names.
    The conversion step runs unrestricted (it is not measured). With --isa native no variable is set.

Not run by CI. Running the whole suite at 512 takes many minutes and several GB of memory per side; with
--openvino the UNet's IR takes about 3.3 GB of disk per resolution and batch, and converting it takes
minutes and more memory than running it.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_ASSETS = ROOT / "assets" / "clip-tokenizer"
COMPONENTS = ["unet", "vae-encode", "vae-decode", "text-encoder", "img2img"]
OPENVINO_COMPONENTS = ["unet", "vae-encode", "vae-decode", "text-encoder"]
OPENVINO_CACHE = ROOT / "target" / "openvino-cache"
# Bump when the wrappers below change what is converted, so that cached IR is converted again.
OPENVINO_WRAPPER_VERSION = 1

# --isa avx2: the environment of each side's measured process (see the docstring).
ISA_ENV = {
    "native": {"pytorch": {}, "pictor": {}, "openvino": {}},
    "avx2": {
        "pytorch": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
        "pictor": {"PICTOR_CPU": "avx2"},
        "openvino": {"OV_CPU_MAX_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    },
}

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
# stable-diffusion-xl-base-1.0's unet/config.json, as in crates/engine/src/bench.rs.
SDXL_UNET = dict(
    in_channels=4, out_channels=4,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, sample_size=128,
)
SDXL_VAE = dict(SD15_VAE, scaling_factor=0.13025, sample_size=1024, force_upcast=True)
# OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's text_encoder_2).
CLIP_BIGG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120,
    num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
    hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SDXL_EULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
)
# SD 1.5's scheduler/scheduler_config.json, as Pictor's random model uses it.
SD15_PNDM = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
)


# ----------------------------------------------------------------------------------------------------------
# Worker: one measurement, in this process.


def vm_hwm_mib(key="VmHWM"):
    """Peak resident set size of this process (VmHWM; or another kB line of /proc/self/status) in MiB,
    or None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def median(times):
    t = sorted(times)
    n = len(t)
    return t[n // 2] if n % 2 else (t[n // 2 - 1] + t[n // 2]) / 2.0


def timed_runs(run, iterations, sync=None):
    """One warm-up call of `run`, then the seconds of each of `iterations` timed calls; `sync` (a GPU's
    synchronize) ends each call where the work is queued asynchronously."""
    sync = sync or (lambda: None)
    run()
    sync()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return times


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


# Where the networks are built and run ("cpu" or "cuda"); set by the worker from --device.
DEVICE = "cpu"


def build(make, dtype, torch):
    """Builds `make()` with its parameters created in `dtype` on DEVICE (no float32 copy first, so a bf16
    model's peak memory is that of bf16 weights, as in Pictor), then draws Pictor's random weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            model = make()
    finally:
        torch.set_default_dtype(previous)
    return randomize(model, torch).to(dtype)


def place(tensor, dtype):
    """An input drawn on the CPU (the same values on every device), moved to DEVICE in `dtype`."""
    return tensor.to(device=DEVICE, dtype=dtype)


def build_unet(dtype, torch, arch="sd15"):
    from diffusers import UNet2DConditionModel

    config = SDXL_UNET if arch == "sdxl" else SD15_UNET
    return build(lambda: UNet2DConditionModel(**config), dtype, torch)


def build_vae(dtype, torch, arch="sd15"):
    from diffusers import AutoencoderKL

    config = SDXL_VAE if arch == "sdxl" else SD15_VAE
    return build(lambda: AutoencoderKL(**config), dtype, torch)


def build_text_encoder_2(dtype, torch):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)), dtype, torch)


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
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.precision, torch.float32)
    b, res = opts.batch, opts.resolution
    if opts.component in ("vae-encode", "vae-decode"):
        vae = build_vae(dtype, torch, opts.arch)
        if opts.component == "vae-encode":
            images = place(torch.randn(b, 3, res, res) * 0.5, dtype)
            return (lambda: vae.encode(images).latent_dist), str(dtype)
        latents = place(torch.randn(b, 4, res // 8, res // 8), dtype)
        return (lambda: vae.decode(latents).sample), str(dtype)
    if opts.arch == "sdxl":
        return make_sdxl_run(opts, torch, dtype)
    if opts.component == "unet":
        unet = build_unet(dtype, torch)
        if opts.tomesd:
            import tomesd

            tomesd.apply_patch(unet, ratio=0.5)
        latents = place(torch.randn(b, 4, res // 8, res // 8), dtype)
        context = place(torch.randn(b, 77, 768), dtype)
        return (lambda: unet(latents, 500, encoder_hidden_states=context, return_dict=False)), str(dtype)
    if opts.component == "text-encoder":
        # Pictor runs the text encoder in fp32 whatever the precision.
        text = build_text_encoder(torch.float32, torch)
        ids = torch.tensor([(i * 7919) % 49408 for i in range(b * 77)], dtype=torch.long).reshape(b, 77)
        ids = ids.to(DEVICE)
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


def make_sdxl_run(opts, torch, dtype):
    """make_run for the SDXL base's UNet, text encoders and img2img (its VAE is built by make_run)."""
    b, res = opts.batch, opts.resolution
    if opts.component == "unet":
        unet = build_unet(dtype, torch, "sdxl")
        if opts.tomesd:
            import tomesd

            tomesd.apply_patch(unet, ratio=0.5)
        latents = place(torch.randn(b, 4, res // 8, res // 8), dtype)
        context = place(torch.randn(b, 77, 2048), dtype)
        added = {"text_embeds": place(torch.randn(b, 1280), dtype),
                 "time_ids": place(torch.tensor([[res, res, 0, 0, res, res]] * b), dtype)}
        return (lambda: unet(latents, 500, encoder_hidden_states=context, added_cond_kwargs=added,
                             return_dict=False)), str(dtype)
    if opts.component == "text-encoder":
        text = build_text_encoder(torch.float32, torch)
        text_2 = build_text_encoder_2(torch.float32, torch)
        ids = torch.tensor([(i * 7919) % 49408 for i in range(b * 77)], dtype=torch.long).reshape(b, 77)
        ids = ids.to(DEVICE)

        def run():
            text(input_ids=ids, output_hidden_states=True)
            return text_2(input_ids=ids, output_hidden_states=True)

        return run, str(torch.float32)
    if opts.component == "img2img":
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
        from transformers import CLIPTokenizer

        def tokenizer(pad):
            return CLIPTokenizer.from_pretrained(TOKENIZER_ASSETS, pad_token=pad, model_max_length=77)

        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=build_vae(dtype, torch, "sdxl"),
            text_encoder=build_text_encoder(dtype, torch),
            text_encoder_2=build_text_encoder_2(dtype, torch),
            tokenizer=tokenizer("<|endoftext|>"),
            tokenizer_2=tokenizer("!"),
            unet=build_unet(dtype, torch, "sdxl"),
            scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER),
        )
        pipe.set_progress_bar_config(disable=True)
        init = gradient_image(res)

        def run():
            return pipe(prompt="a photo of a cat", image=init, strength=0.75, num_inference_steps=opts.steps,
                        guidance_scale=7.5, num_images_per_prompt=b,
                        generator=torch.Generator().manual_seed(0), output_type="pil")

        return run, str(dtype)
    raise ValueError(f"unknown component {opts.component!r}")


def worker(opts):
    """Runs one measurement in this process and prints its result as one JSON line."""
    import torch
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    global DEVICE
    DEVICE = opts.device
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gpu = {}
    sync = None
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA GPU")
        sync = torch.cuda.synchronize
    baseline = vm_hwm_mib()
    run, ran_in = make_run(opts, torch)
    with torch.inference_mode():
        times = timed_runs(run, opts.iterations, sync)
    if DEVICE == "cuda":
        gpu = {"gpu": torch.cuda.get_device_name(0), "torch_cuda": torch.version.cuda,
               "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}
    print(json.dumps({
        "device": DEVICE,
        **gpu,
        "times_s": times,
        "median_s": median(times),
        "peak_rss_mib": vm_hwm_mib(),
        "baseline_rss_mib": baseline,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": ran_in,
    }))


# ----------------------------------------------------------------------------------------------------------
# OpenVINO: conversion (one process, not measured) and measurement (another process).


def openvino_inputs(component, res, b):
    """The inputs of `component` in OpenVINO's order: a list of (name, shape, kind), kind being "normal"
    (N(0, 1)), "image" (N(0, 0.5^2)) or "ids" (the token ids of the PyTorch side)."""
    if component == "unet":
        return [("latents", [b, 4, res // 8, res // 8], "normal"), ("context", [b, 77, 768], "normal")]
    if component == "vae-encode":
        return [("images", [b, 3, res, res], "image")]
    if component == "vae-decode":
        return [("latents", [b, 4, res // 8, res // 8], "normal")]
    if component == "text-encoder":
        return [("input_ids", [b, 77], "ids")]
    raise ValueError(f"no OpenVINO side for {component!r}")


def token_ids(b):
    """The text encoder's input ids, as a flat list: ids[i] = i * 7919 mod 49408."""
    return [(i * 7919) % 49408 for i in range(b * 77)]


def openvino_ir_dir(m, cache):
    """The cache folder of measurement `m`'s IR (the text encoder's does not depend on the resolution)."""
    if m["component"] == "text-encoder":
        return Path(cache) / f"text-encoder-b{m['batch']}"
    return Path(cache) / f"{m['component']}-{m['resolution']}-b{m['batch']}"


def package_version(pkg):
    """The installed version of `pkg`, or None."""
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def openvino_meta(m):
    """What a cached IR must have been converted from to be reused."""
    return {
        "component": m["component"],
        "inputs": [[n, s] for n, s, _ in openvino_inputs(m["component"], m["resolution"], m["batch"])],
        "wrapper_version": OPENVINO_WRAPPER_VERSION,
        "openvino": package_version("openvino"),
        "torch": package_version("torch"),
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
    }


def openvino_cached(m, cache):
    """The cached IR folder of `m` if it holds a complete conversion of the same thing, else None."""
    d = openvino_ir_dir(m, cache)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not ((d / "model.xml").is_file() and (d / "model.bin").is_file()):
        return None
    want = openvino_meta(m)
    return d if all(meta.get(k) == v for k, v in want.items()) else None


def openvino_convert(opts):
    """Builds the fp32 network of `opts`, converts it to OpenVINO IR and saves it in opts.convert_openvino
    (written to a sibling folder first and renamed, so an interrupted conversion leaves nothing behind).
    Prints one JSON line."""
    import torch
    import diffusers
    import transformers
    import openvino as ov

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    start = time.perf_counter()
    comp, res, b = opts.component, opts.resolution, opts.batch
    f32 = torch.float32
    if comp == "unet":
        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.unet = build_unet(f32, torch)

            def forward(self, latents, context):
                return self.unet(latents, 500, encoder_hidden_states=context, return_dict=False)[0]
    elif comp in ("vae-encode", "vae-decode"):
        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.vae = build_vae(f32, torch)

            def forward(self, x):
                if comp == "vae-encode":
                    return self.vae._encode(x)  # encoder + quant_conv: latent_dist's parameters (moments)
                return self.vae.decode(x, return_dict=False)[0]
    elif comp == "text-encoder":
        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.text = build_text_encoder(f32, torch)

            def forward(self, input_ids):
                return self.text(input_ids=input_ids, return_dict=False)[0]  # last_hidden_state
    else:
        raise ValueError(f"no OpenVINO side for {comp!r}")
    model = Wrapper().eval()
    example = []
    for _, shape, kind in openvino_inputs(comp, res, b):
        if kind == "ids":
            example.append(torch.tensor(token_ids(b), dtype=torch.long).reshape(shape))
        else:
            example.append(torch.randn(*shape) * (0.5 if kind == "image" else 1.0))
    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=tuple(example))
    ov_model.reshape({i: ov.PartialShape(shape)
                      for i, (_, shape, _) in enumerate(openvino_inputs(comp, res, b))})
    target = Path(opts.convert_openvino)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ov.save_model(ov_model, str(tmp / "model.xml"), compress_to_fp16=False)
        convert_s = time.perf_counter() - start
        m = dict(component=comp, resolution=res, batch=b)
        (tmp / "meta.json").write_text(json.dumps(dict(openvino_meta(m), convert_s=convert_s), indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"convert_s": convert_s, "convert_peak_rss_mib": vm_hwm_mib(),
                      "openvino": ov.__version__}))


def kernel_isa(primitive):
    """The instruction set an OpenVINO kernel's name (rt_info 'primitiveType') says it runs at."""
    p = primitive.lower()
    for isa in ("amx", "avx512", "avx2", "sse41"):
        if isa in p:
            return isa
    return "mlas" if "mlas" in p else "other"


def prop_text(v):
    """A property value as OpenVINO spells it ("f32", not "<Type: 'float32'>")."""
    return v.get_type_name() if hasattr(v, "get_type_name") else str(v)


def openvino_worker(opts):
    """Reads the IR in opts.ir, compiles it for the CPU, runs one measurement, prints one JSON line."""
    import numpy as np
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    baseline = vm_hwm_mib()
    threads = os.cpu_count() or 1
    core = ov.Core()
    start = time.perf_counter()
    ov_model = core.read_model(str(Path(opts.ir) / "model.xml"))
    read_s = time.perf_counter() - start
    config = {
        props.inference_num_threads(): threads,
        hints.performance_mode(): hints.PerformanceMode.LATENCY,
        hints.inference_precision(): ov.Type.f32,
    }
    start = time.perf_counter()
    compiled = core.compile_model(ov_model, "CPU", config)
    compile_s = time.perf_counter() - start
    del ov_model
    rng = np.random.default_rng(0)
    inputs = []
    for _, shape, kind in openvino_inputs(opts.component, opts.resolution, opts.batch):
        if kind == "ids":
            inputs.append(np.array(token_ids(opts.batch), dtype=np.int64).reshape(shape))
        else:
            inputs.append((rng.standard_normal(shape) * (0.5 if kind == "image" else 1.0)).astype(np.float32))
    request = compiled.create_infer_request()

    def run():
        return request.infer(inputs, share_inputs=True, share_outputs=True)

    times = timed_runs(run, opts.iterations)
    peak = vm_hwm_mib()
    primitives, isas = {}, {}
    for node in compiled.get_runtime_model().get_ops():
        rt = node.get_rt_info()
        layer = rt["layerType"].astype(str) if "layerType" in rt else ""
        if layer in ("Input", "Output", "Const") or "primitiveType" not in rt:
            continue
        prim = rt["primitiveType"].astype(str)
        primitives[f"{layer}:{prim}"] = primitives.get(f"{layer}:{prim}", 0) + 1
        isas[kernel_isa(prim)] = isas.get(kernel_isa(prim), 0) + 1
    print(json.dumps({
        "times_s": times,
        "median_s": median(times),
        "peak_rss_mib": peak,
        "baseline_rss_mib": baseline,
        "rss_anon_mib": vm_hwm_mib("RssAnon"),
        "rss_file_mib": vm_hwm_mib("RssFile"),
        "read_s": read_s,
        "compile_s": compile_s,
        "openvino": ov.__version__,
        "ov_threads": int(compiled.get_property(props.inference_num_threads())),
        "compiled": {k: prop_text(compiled.get_property(k)) for k in (
            props.inference_num_threads(), hints.performance_mode(), hints.inference_precision(),
            props.num_streams())},
        "dtype": "f32",
        "kernel_isas": isas,
        "primitive_types": primitives,
    }))


# ----------------------------------------------------------------------------------------------------------
# Driver: one subprocess per measurement, optional Pictor run, the table.


def measurement_args(m):
    """The command-line arguments of measurement `m`, shared by this script's worker and `pictor bench`."""
    args = [
        "--arch", m.get("arch", "sd15"), "--component", m["component"], "--resolution", str(m["resolution"]), "--batch", str(m["batch"]),
        "--iterations", str(m["iterations"]), "--precision", m["precision"], "--steps", str(m["steps"]),
    ]
    if m.get("device", "cpu") != "cpu":
        args += ["--device", m["device"]]
    if m["tomesd"]:
        args.append("--tomesd")
    return args


def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON object in its output")


def run_side(cmd, timeout, env=None):
    """Runs `cmd` (with the variables `env` added to this process's environment), returns (its JSON
    result, None) or (None, what went wrong)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, **env) if env else None)
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
    common = dict(arch=opts.arch, iterations=opts.iterations, precision=opts.precision, tomesd=opts.tomesd,
                  steps=opts.steps, device=opts.device)
    rows = []
    if opts.arch == "sdxl":
        rows.append(dict(common, component="unet", resolution=1024, batch=2))
        for comp in ("vae-encode", "vae-decode"):
            rows.append(dict(common, component=comp, resolution=1024, batch=1))
        rows.append(dict(common, component="text-encoder", resolution=1024, batch=2))
        return rows
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

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "tomesd": package_version("tomesd"),
        "openvino": package_version("openvino"),
    }


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def env_text(env):
    return " ".join(f"{k}={v}" for k, v in env.items()) or "nothing set"


def seen(rows, side, key):
    """The distinct values of `key` in the `side` results of `rows`, as text."""
    vals = sorted({str(r[side][key]) for r in rows if r.get(side) and r[side].get(key) is not None})
    return "/".join(vals) if vals else "-"


def print_table(info, rows, compare, openvino, isa):
    print(f"Machine: {info['cpu']}, {info['cores']} cores; {info['date']}")
    print(f"PyTorch side: torch {info['torch']}, diffusers {info['diffusers']}, transformers {info['transformers']}"
          f", tomesd {info['tomesd']}; torch threads = os.cpu_count() = {info['cores']}; each measurement"
          " in a fresh process, peak = VmHWM (baseline = VmHWM after the imports)")
    if openvino:
        print(f"OpenVINO side: openvino {info['openvino']}, CPU plugin, IR converted from the same fp32 networks"
              f" in a separate process (neither timed nor in the peak); compile_model(\"CPU\","
              f" INFERENCE_NUM_THREADS={seen(rows, 'openvino', 'ov_threads')}, PERFORMANCE_HINT=LATENCY,"
              " INFERENCE_PRECISION_HINT=f32); fresh process per measurement, peak = VmHWM (OV baseline ="
              " VmHWM after import openvino); no OpenVINO side for img2img or --tomesd (\"-\")")
    envs = ISA_ENV[isa]
    print(f"ISA: {isa}. PyTorch: {env_text(envs['pytorch'])} (torch cpu capability:"
          f" {seen(rows, 'pytorch', 'cpu_capability')})"
          + (f"; Pictor: {env_text(envs['pictor'])} (tier: {seen(rows, 'pictor', 'cpu_tier')})" if compare else ""))
    if openvino:
        counts = {}
        for r in rows:
            for k, n in ((r.get("openvino") or {}).get("kernel_isas") or {}).items():
                counts[k] = counts.get(k, 0) + n
        order = ["amx", "avx512", "avx2", "sse41", "mlas", "other"]
        kernels = ", ".join(f"{k} {counts[k]}" for k in order if k in counts) or "-"
        print(f"     OpenVINO: {env_text(envs['openvino'])}; executed kernels by the ISA in their names: {kernels}"
              + (" (mlas = FullyConnected on MLAS, which picks its ISA from CPUID: no switch found restricts it;"
                 " other = reference/ISA-generic kernels)" if "mlas" in counts else ""))
    head = ["component", "res", "batch", "prec", "tome", "iters", "PyTorch s", "Pictor s", "Pictor tier",
            "Pictor/PyTorch", "OpenVINO s", "Pictor/OpenVINO", "PyTorch peak MiB", "(baseline)",
            "Pictor peak MiB", "OpenVINO peak MiB", "(OV baseline)"]
    if not compare:
        head = [h for h in head if not h.startswith("Pictor")]
    if not openvino:
        head = [h for h in head if "OpenVINO" not in h and h != "(OV baseline)"]
    lines = []
    errors = []
    for r in rows:
        pt, pc, ov = r.get("pytorch"), r.get("pictor"), r.get("openvino")
        ov_skipped = r.get("openvino_skipped") is not None
        cells = [
            ("sdxl " if r.get("arch") == "sdxl" else "")
            + r["component"] + (f" ({r['steps']} steps)" if r["component"] == "img2img" else ""),
            str(r["resolution"]), str(r["batch"]), r["precision"], "yes" if r["tomesd"] else "no",
            str(r["iterations"]),
            fmt(pt and pt["median_s"], ".3f") if pt else "error",
        ]
        if compare:
            cells.append((fmt(pc["median_s"], ".3f") if pc else "error")
                         + (f" ({r['pictor_precision']})" if r.get("pictor_precision") != r["precision"] else ""))
            cells.append(str(pc.get("cpu_tier") or "-") if pc else "-")
            ratio = pc["median_s"] / pt["median_s"] if pt and pc and pt["median_s"] > 0 else None
            cells.append(fmt(ratio, ".2f"))
        if openvino:
            if ov_skipped:
                cells.append("-")
            else:
                cells.append(fmt(ov["median_s"], ".3f") + (" (fp32)" if r["precision"] != "fp32" else "")
                             if ov else "error")
            if compare:
                ratio = pc["median_s"] / ov["median_s"] if ov and pc and ov["median_s"] > 0 else None
                cells.append(fmt(ratio, ".2f"))
        cells.append(fmt(pt and pt.get("peak_rss_mib"), ".0f") if pt else "error")
        cells.append(fmt(pt and pt.get("baseline_rss_mib"), ".0f") if pt else "-")
        if compare:
            cells.append(fmt(pc.get("peak_rss_mib"), ".0f") if pc else "error")
        if openvino:
            cells.append("-" if ov_skipped else fmt(ov.get("peak_rss_mib"), ".0f") if ov else "error")
            cells.append(fmt(ov and ov.get("baseline_rss_mib"), ".0f"))
        lines.append(cells)
        for side in ("pytorch", "pictor", "openvino"):
            if r.get(f"{side}_error"):
                errors.append(f"{r['component']} {r['resolution']} batch {r['batch']}, {side}: {r[side + '_error']}")
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for cells in lines:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    for e in errors:
        print(f"error: {e}")


def run_openvino(row, m, args, opts, env):
    """The OpenVINO side of measurement `m`: converts (or reuses) its IR in one process, then measures it in
    a fresh one with `env`. Fills row["openvino"], row["openvino_error"] and row["openvino_ir"], or
    row["openvino_skipped"] where there is no OpenVINO side."""
    row["openvino"] = row["openvino_error"] = None
    if m.get("arch") == "sdxl":
        row["openvino_skipped"] = "no OpenVINO side for sdxl"
        return
    if m.get("device", "cpu") != "cpu":
        row["openvino_skipped"] = "no OpenVINO side on a GPU"
        return
    if m["component"] not in OPENVINO_COMPONENTS:
        row["openvino_skipped"] = f"no OpenVINO side for {m['component']}"
        return
    if m["tomesd"]:
        row["openvino_skipped"] = "no token merging in OpenVINO"
        return
    script = str(Path(__file__).resolve())
    ir = openvino_cached(m, opts.openvino_cache)
    if ir is not None:
        row["openvino_ir"] = {"path": str(ir), "cached": True}
    else:
        target = openvino_ir_dir(m, opts.openvino_cache)
        if not opts.json:
            print(f"  converting to OpenVINO IR in {target} ...", file=sys.stderr, flush=True)
        converted, err = run_side([sys.executable, script, "--convert-openvino", str(target), *args],
                                  opts.timeout)
        if err:
            row["openvino_error"] = f"conversion: {err}"
            return
        ir = target
        row["openvino_ir"] = dict(converted, path=str(ir), cached=False)
    row["openvino"], row["openvino_error"] = run_side(
        [sys.executable, script, "--worker", "--runtime", "openvino", "--ir", str(ir), *args], opts.timeout, env)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                epilog="See the module docstring (the top of this file) for details.")
    p.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--component", choices=COMPONENTS, default="unet")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tomesd", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--suite", action="store_true", help="run the issue's set of measurements")
    p.add_argument("--compare", metavar="BIN", help="also run BIN bench ... --json (the pictor binary)")
    p.add_argument("--pictor-precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="Pictor's precision when it differs from --precision (bf16 against PyTorch fp32)")
    p.add_argument("--openvino", action="store_true",
                   help="also time the networks in OpenVINO (unet, vae-encode, vae-decode, text-encoder)")
    p.add_argument("--openvino-cache", metavar="DIR", default=str(OPENVINO_CACHE),
                   help="where converted OpenVINO IR is kept and reused (default target/openvino-cache)")
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: restrict every measured process to AVX2 (see the docstring)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per measurement and side")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--runtime", choices=["pytorch", "openvino"], default="pytorch", help=argparse.SUPPRESS)
    p.add_argument("--ir", help=argparse.SUPPRESS)
    p.add_argument("--convert-openvino", metavar="DIR", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.resolution <= 0 or opts.resolution % 8:
        p.error("--resolution must be a positive multiple of 8")
    if opts.batch < 1 or opts.iterations < 1 or opts.steps < 1:
        p.error("--batch, --iterations and --steps must be at least 1")
    if opts.convert_openvino:
        openvino_convert(opts)
        return
    if opts.worker:
        openvino_worker(opts) if opts.runtime == "openvino" else worker(opts)
        return

    if opts.suite:
        measurements = suite(opts)
    else:
        measurements = [dict(arch=opts.arch, component=opts.component, resolution=opts.resolution, batch=opts.batch,
                             iterations=opts.iterations, precision=opts.precision, tomesd=opts.tomesd,
                             steps=opts.steps, device=opts.device)]
    compare = None
    if opts.compare:
        compare = str(Path(opts.compare).resolve()) if os.sep in opts.compare else opts.compare
    info = machine()
    envs = ISA_ENV[opts.isa]
    script = str(Path(__file__).resolve())
    rows = []
    for m in measurements:
        args = measurement_args(m)
        if not opts.json:
            print(f"running {' '.join(args)} ...", file=sys.stderr, flush=True)
        row = dict(m)
        row["pytorch"], row["pytorch_error"] = run_side(
            [sys.executable, script, "--worker", *args], opts.timeout, envs["pytorch"])
        if compare:
            pictor_args = measurement_args(dict(m, precision=opts.pictor_precision or m["precision"]))
            row["pictor_precision"] = opts.pictor_precision or m["precision"]
            row["pictor"], row["pictor_error"] = run_side([compare, "bench", *pictor_args, "--json"],
                                                          opts.timeout, envs["pictor"])
        if opts.openvino:
            run_openvino(row, m, args, opts, envs["openvino"])
        rows.append(row)
        if not opts.json:
            # Each result as soon as it is known, so an interrupted suite keeps what it measured.
            pt, pc, ov = row.get("pytorch"), row.get("pictor"), row.get("openvino")
            done = (f"  PyTorch {fmt(pt and pt['median_s'], '.3f')} s, peak "
                    f"{fmt(pt and pt.get('peak_rss_mib'), '.0f')} MiB")
            if compare:
                done += (f"; Pictor ({row['pictor_precision']}, tier {pc and pc.get('cpu_tier') or '-'})"
                         f" {fmt(pc and pc['median_s'], '.3f')} s, peak {fmt(pc and pc.get('peak_rss_mib'), '.0f')} MiB")
                if pt and pc and pt["median_s"] > 0:
                    done += f"; ratio {pc['median_s'] / pt['median_s']:.2f}"
            if opts.openvino:
                if row.get("openvino_skipped"):
                    done += f"; OpenVINO -: {row['openvino_skipped']}"
                else:
                    done += (f"; OpenVINO {fmt(ov and ov['median_s'], '.3f')} s, peak "
                             f"{fmt(ov and ov.get('peak_rss_mib'), '.0f')} MiB")
                    if compare and ov and pc and ov["median_s"] > 0:
                        done += f"; Pictor/OpenVINO {pc['median_s'] / ov['median_s']:.2f}"
            print(done, file=sys.stderr, flush=True)
    if opts.json:
        print(json.dumps({"machine": info, "compare": compare, "isa": opts.isa, "isa_env": envs,
                          "openvino": opts.openvino, "rows": rows}, indent=2, sort_keys=True))
    else:
        print_table(info, rows, compare, opts.openvino, opts.isa)
    failed = any(r.get("pytorch_error") or r.get("pictor_error") or r.get("openvino_error") for r in rows)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
