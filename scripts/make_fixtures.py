#!/usr/bin/env python3
"""Writes Pictor's reference fixtures (tests/fixtures/) with diffusers.

Run by hand from the repository root (never by CI; the outputs are committed):

    /work/venv/bin/python scripts/make_fixtures.py                        # ~2.5 minutes on 2 cores
    /work/venv/bin/python scripts/make_fixtures.py --no-precision-check   # ~1 minute, no precision.json

The precision check re-runs every case in float64 (with the same float32 noise) and writes
tests/fixtures/precision.json: how far float32 rounding alone moves each image, i.e. the tolerance a
correct float32 port can be held to.

Needs torch, diffusers, transformers and safetensors (CPU only, no network). The CLIP BPE files
come from assets/clip-tokenizer/.

What it writes (see tests/fixtures/README.md, which this script also writes):
  - models/checkpoints/{sd1-tiny,sd2-tiny,pix2pix-tiny}/   tiny random pipelines, diffusers layout
  - models/checkpoints/{sd1,sd2}-tiny-single.safetensors    the same weights in original LDM naming
  - models/SINGLE_FILE.md                                   the LDM <-> diffusers naming used
  - init-64.png, init-72x56.png                             init images
  - cases.json, cases/<name>/{<i>.png,tensors.safetensors}  reference generations + intermediates
  - rng.json                                                torch CPU randn reference values
  - tokenizer.json                                          CLIP tokenizer reference ids

Determinism: every random number comes from explicitly seeded torch generators, torch runs on one
thread, and all JSON is written with sorted keys, so re-running on the same machine and library
versions reproduces the files byte for byte. (Different CPUs or library versions may change the
last bits of float results.)

The weights are random, not trained. To keep them from being degenerate, every Linear/Conv weight
is re-drawn as N(0, gain^2/fan_in), 3x3 conv kernels get a smooth (blur-shaped) random component so
the decoder turns latents into blobs rather than pixel noise, norm layers get jittered affine
parameters, and the VAE's quant_conv is rescaled so that latents * scaling_factor have roughly unit
variance with a small posterior std. The result: images with visible structure that depend on the
prompt, seed, scheduler and every network.
"""

import argparse
import importlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)  # fast on a busy 2-core machine, and thread-count independent results

import diffusers  # noqa: E402
import transformers  # noqa: E402
import safetensors  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
CKPT = FIX / "models" / "checkpoints"
TOKENIZER_ASSETS = ROOT / "assets" / "clip-tokenizer"

SCHEDULERS = {
    c.__name__: c for c in (
        DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
        diffusers.DDPMScheduler, diffusers.LMSDiscreteScheduler, diffusers.DPMSolverMultistepScheduler,
        diffusers.DPMSolverSinglestepScheduler, diffusers.HeunDiscreteScheduler, diffusers.KDPM2DiscreteScheduler,
        diffusers.KDPM2AncestralDiscreteScheduler, diffusers.UniPCMultistepScheduler,
        diffusers.DEISMultistepScheduler, diffusers.LCMScheduler,
    )
}

# The schedulers added for the scheduler issue: (short name, class, takes use_karras_sigmas).
MORE_SCHEDULERS = [
    ("ddpm", "DDPMScheduler", False),
    ("lms", "LMSDiscreteScheduler", True),
    ("dpm2m", "DPMSolverMultistepScheduler", True),
    ("dpmsingle", "DPMSolverSinglestepScheduler", True),
    ("heun", "HeunDiscreteScheduler", True),
    ("kdpm2", "KDPM2DiscreteScheduler", True),
    ("kdpm2a", "KDPM2AncestralDiscreteScheduler", True),
    ("unipc", "UniPCMultistepScheduler", True),
    ("deis", "DEISMultistepScheduler", True),
    ("lcm", "LCMScheduler", False),
]

# --------------------------------------------------------------------------------------------
# Model definitions
# --------------------------------------------------------------------------------------------

# Scheduler configs exactly as the real repositories ship them (only the keys they contain), so
# that `from_config` into another class fills the rest with *that* class's defaults.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
PIX2PIX_SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

SD1_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD1_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.18215,
)
SD1_TEXT = dict(
    vocab_size=49408,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
SD2_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 64, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=[1, 1, 2],
    use_linear_projection=True,
    upcast_attention=True,
    cross_attention_dim=64,
    norm_num_groups=32,
)
SD2_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.18215,
)
SD2_TEXT = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

MODELS = {
    "sd1-tiny": dict(
        seed=1001,
        pipeline_class="StableDiffusionPipeline",
        unet=SD1_UNET,
        vae=SD1_VAE,
        text=SD1_TEXT,
        pad_token="<|endoftext|>",
        scheduler=SD15_SCHEDULER,
        dtype=torch.float16,
    ),
    "sd2-tiny": dict(
        seed=1002,
        pipeline_class="StableDiffusionPipeline",
        unet=SD2_UNET,
        vae=SD2_VAE,
        text=SD2_TEXT,
        pad_token="!",
        scheduler=SD21_SCHEDULER,
        dtype=torch.bfloat16,
    ),
    "pix2pix-tiny": dict(
        seed=1003,
        pipeline_class="StableDiffusionInstructPix2PixPipeline",
        unet=dict(SD1_UNET, in_channels=8),
        vae=SD1_VAE,
        text=SD1_TEXT,
        pad_token="<|endoftext|>",
        scheduler=PIX2PIX_SCHEDULER,
        dtype=torch.float32,
    ),
}

# How the random weights are drawn (see liven()).
LIVEN = dict(
    gain=1.0,  # Linear/Conv weights ~ N(0, gain^2 / fan_in)
    bias_std=0.05,
    norm_jitter=0.1,  # GroupNorm/LayerNorm weight ~ 1 + N(0, j^2), bias ~ N(0, j^2)
    qk_gain=1.5,  # sharper attention than a plain draw, so the text actually steers the UNet
    smooth=0.9,  # share of a blur-shaped component in 3x3 kernels (rest: white 3x3 noise)
    time_gain=2.0,  # ResNet time-embedding projections, so the timestep visibly matters
    token_std=1.0,
    position_std=0.5,
    vae_latent_gain=8.0,  # quant_conv mean rows x this, post_quant_conv / this
    vae_logvar_bias=-2.0,  # posterior std ~ e^-1 before the latent gain
)


def liven(model, gen, cfg=LIVEN):
    """Re-draws every parameter of `model` from `gen` (see the module docstring)."""
    touched = set()
    blur = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    blur = torch.outer(blur, blur)
    blur = (blur / blur.norm()).float()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                gain = cfg["gain"]
                if name.split(".")[-1] in ("to_q", "to_k", "q_proj", "k_proj"):
                    gain *= cfg["qk_gain"]
                if name.endswith("time_emb_proj"):
                    gain *= cfg["time_gain"]
                w = torch.randn(m.weight.shape, generator=gen)
                if w.dim() == 4 and w.shape[-2:] == (3, 3):
                    s = cfg["smooth"]
                    c = torch.randn(w.shape[:2], generator=gen)[..., None, None] * blur
                    w = s * c + math.sqrt(1 - s * s) * w
                m.weight.copy_(w * (gain / math.sqrt(fan_in)))
                touched.add(id(m.weight))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * cfg["bias_std"])
                    touched.add(id(m.bias))
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                j = cfg["norm_jitter"]
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=gen) * j)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * j)
                touched.update((id(m.weight), id(m.bias)))
            elif isinstance(m, nn.Embedding):
                std = cfg["position_std"] if "position" in name else cfg["token_std"]
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                touched.add(id(m.weight))
    missed = [n for n, p in model.named_parameters() if id(p) not in touched]
    assert not missed, f"liven() did not cover {missed}"


def scale_vae_latents(vae):
    """Rescales a drawn VAE's quant_conv so that latents * scaling_factor have roughly unit variance with a
    small posterior std (see the module docstring)."""
    with torch.no_grad():
        lc = vae.config.latent_channels
        k = LIVEN["vae_latent_gain"]
        vae.quant_conv.weight[:lc] *= k
        vae.quant_conv.bias[:lc] *= k
        vae.quant_conv.bias[lc:] = LIVEN["vae_logvar_bias"]
        vae.post_quant_conv.weight /= k


def build_models(spec):
    torch.manual_seed(spec["seed"])
    gen = torch.Generator("cpu").manual_seed(spec["seed"])
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    text = CLIPTextModel(CLIPTextConfig(**spec["text"]))
    for model in (unet, vae, text):
        liven(model, gen)
    scale_vae_latents(vae)
    # Round to the storage dtype now; the references run in float32 on exactly these values.
    return [m.to(spec["dtype"]).eval() for m in (unet, vae, text)]


def write_json(path, obj, indent=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n")


def write_tokenizer_dir(d, pad_token):
    """tokenizer/ as Stable Diffusion repositories ship it (vocab.json, merges.txt and the two small
    JSON files). transformers 5 would write a 3.6 MB tokenizer.json instead, which real SD repos do
    not have; the loader must cope with the classic files."""
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TOKENIZER_ASSETS / "vocab.json", d / "vocab.json")
    shutil.copyfile(TOKENIZER_ASSETS / "merges.txt", d / "merges.txt")

    def added(content):
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    write_json(
        d / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": added("<|startoftext|>"),
            "do_lower_case": True,
            "eos_token": added("<|endoftext|>"),
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": added("<|endoftext|>"),
        },
    )
    plain = {k: v for k, v in added("x").items() if k != "__type"}
    write_json(
        d / "special_tokens_map.json",
        {
            "bos_token": dict(plain, content="<|startoftext|>"),
            "eos_token": dict(plain, content="<|endoftext|>"),
            "pad_token": pad_token,
            "unk_token": dict(plain, content="<|endoftext|>"),
        },
    )


def save_pipeline_folder(model_id, spec, unet, vae, text):
    d = CKPT / model_id
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    unet.save_pretrained(d / "unet", safe_serialization=True)
    vae.save_pretrained(d / "vae", safe_serialization=True)
    text.save_pretrained(d / "text_encoder")  # for config.json
    # transformers 5 drops the `text_model.` prefix when saving; every real SD repository (written by
    # transformers 4) has it, and transformers 5 still loads it, so write the weights the classic way.
    text_sd = {("" if k.startswith("text_model.") else "text_model.") + k: v.contiguous() for k, v in text.state_dict().items()}
    save_file(text_sd, d / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer_dir(d / "tokenizer", spec["pad_token"])
    sched = dict(spec["scheduler"], _diffusers_version=diffusers.__version__)
    write_json(d / "scheduler" / "scheduler_config.json", sched)
    write_json(
        d / "model_index.json",
        {
            "_class_name": spec["pipeline_class"],
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", spec["scheduler"]["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    return d


def load_pipeline(model_id):
    cls = StableDiffusionInstructPix2PixPipeline if model_id.startswith("pix2pix") else StableDiffusionImg2ImgPipeline
    pipe = cls.from_pretrained(
        CKPT / model_id, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------
# diffusers <-> original LDM (CompVis / Stability) naming
# --------------------------------------------------------------------------------------------

LDM_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_key_to_ldm(key, cfg):
    """One diffusers UNet2DConditionModel key -> its name under model.diffusion_model."""
    per_block = cfg["layers_per_block"]  # down blocks: that many resnets (+1 slot for the downsampler)
    p = key.split(".")
    tail = ".".join(p[1:])
    if p[0] == "time_embedding":
        return {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[p[1]] + "." + ".".join(p[2:])
    if p[0] == "conv_in":
        return "input_blocks.0.0." + tail
    if p[0] == "conv_norm_out":
        return "out.0." + tail
    if p[0] == "conv_out":
        return "out.2." + tail

    def resnet(rest):
        return LDM_UNET_RESNET[rest[0]] + "." + ".".join(rest[1:])

    if p[0] == "down_blocks":
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        slot = 1 + i * (per_block + 1)
        if kind == "resnets":
            return f"input_blocks.{slot + j}.0." + resnet(rest)
        if kind == "attentions":
            return f"input_blocks.{slot + j}.1." + ".".join(rest)
        if kind == "downsamplers" and j == 0 and rest[0] == "conv":
            return f"input_blocks.{slot + per_block}.0.op." + ".".join(rest[1:])
    if p[0] == "mid_block":
        kind, j, rest = p[1], int(p[2]), p[3:]
        if kind == "resnets":
            return f"middle_block.{2 * j}." + resnet(rest)
        if kind == "attentions" and j == 0:
            return "middle_block.1." + ".".join(rest)
    if p[0] == "up_blocks":
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        slot = i * (per_block + 1)  # up blocks have per_block + 1 resnets
        if kind == "resnets":
            return f"output_blocks.{slot + j}.0." + resnet(rest)
        if kind == "attentions":
            return f"output_blocks.{slot + j}.1." + ".".join(rest)
        if kind == "upsamplers" and j == 0 and rest[0] == "conv":
            has_attention = "CrossAttn" in cfg["up_block_types"][i]
            return f"output_blocks.{slot + per_block}.{2 if has_attention else 1}.conv." + ".".join(rest[1:])
    raise KeyError(f"no LDM name for UNet key {key}")


def vae_key_to_ldm(key, cfg):
    """One diffusers AutoencoderKL key -> (name under first_stage_model, needs 1x1-conv reshape)."""
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return key, False
    part, q = p[0], p[1:]
    assert part in ("encoder", "decoder"), key

    def resnet(rest):
        return ("nin_shortcut" if rest[0] == "conv_shortcut" else rest[0]) + "." + ".".join(rest[1:])

    n_blocks = len(cfg["block_out_channels"])
    if q[0] in ("conv_in", "conv_out"):
        return key, False
    if q[0] == "conv_norm_out":
        return f"{part}.norm_out." + ".".join(q[1:]), False
    if q[0] == "down_blocks":
        i, kind, j, rest = int(q[1]), q[2], int(q[3]), q[4:]
        if kind == "resnets":
            return f"{part}.down.{i}.block.{j}." + resnet(rest), False
        if kind == "downsamplers" and j == 0 and rest[0] == "conv":
            return f"{part}.down.{i}.downsample.conv." + ".".join(rest[1:]), False
    if q[0] == "up_blocks":
        # LDM numbers decoder levels by resolution (0 = full size), diffusers in execution order.
        i, kind, j, rest = n_blocks - 1 - int(q[1]), q[2], int(q[3]), q[4:]
        if kind == "resnets":
            return f"{part}.up.{i}.block.{j}." + resnet(rest), False
        if kind == "upsamplers" and j == 0 and rest[0] == "conv":
            return f"{part}.up.{i}.upsample.conv." + ".".join(rest[1:]), False
    if q[0] == "mid_block":
        kind, j, rest = q[1], int(q[2]), q[3:]
        if kind == "resnets":
            return f"{part}.mid.block_{j + 1}." + resnet(rest), False
        if kind == "attentions" and j == 0:
            inner = ".".join(rest[:-1])
            return f"{part}.mid.attn_1.{LDM_VAE_ATTENTION[inner]}.{rest[-1]}", inner != "group_norm" and rest[-1] == "weight"
    raise KeyError(f"no LDM name for VAE key {key}")


def key_maps(unet_sd, unet_cfg, vae_sd, vae_cfg):
    unet_map = {k: "model.diffusion_model." + unet_key_to_ldm(k, unet_cfg) for k in unet_sd}
    vae_map = {}
    for k in vae_sd:
        name, reshape = vae_key_to_ldm(k, vae_cfg)
        vae_map[k] = ("first_stage_model." + name, reshape)
    return unet_map, vae_map


OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPENCLIP_PREFIX = "cond_stage_model.model."


def text_to_openclip(text_sd, extra_gen, n_layers, hidden, dtype):
    """HF CLIPTextModel state dict -> OpenCLIP text tower names (SD 2 checkpoints), plus one extra
    random resblock at the end and random text_projection / logit_scale, as real files carry."""
    out = {}
    pre = "text_model."
    out[OPENCLIP_PREFIX + "token_embedding.weight"] = text_sd[pre + "embeddings.token_embedding.weight"]
    out[OPENCLIP_PREFIX + "positional_embedding"] = text_sd[pre + "embeddings.position_embedding.weight"]
    out[OPENCLIP_PREFIX + "ln_final.weight"] = text_sd[pre + "final_layer_norm.weight"]
    out[OPENCLIP_PREFIX + "ln_final.bias"] = text_sd[pre + "final_layer_norm.bias"]
    for n in range(n_layers):
        src = f"{pre}encoder.layers.{n}."
        dst = f"{OPENCLIP_PREFIX}transformer.resblocks.{n}."
        for hf, oc in OPENCLIP_LAYER.items():
            for wb in ("weight", "bias"):
                out[f"{dst}{oc}.{wb}"] = text_sd[f"{src}{hf}.{wb}"]
        for wb in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{wb}"] = torch.cat(
                [text_sd[f"{src}self_attn.{x}_proj.{wb}"] for x in ("q", "k", "v")], dim=0
            )
    # The extra (last) layer: real SD 2 files hold all 24 OpenCLIP layers, diffusers uses 23.
    template = {k[len(f"{OPENCLIP_PREFIX}transformer.resblocks.0."):]: v for k, v in out.items()
                if k.startswith(f"{OPENCLIP_PREFIX}transformer.resblocks.0.")}
    for name, t in sorted(template.items()):
        r = torch.randn(t.shape, generator=extra_gen)
        r = 1 + 0.1 * r if name.startswith("ln_") and name.endswith("weight") else r * (0.05 if t.dim() == 1 else 1 / math.sqrt(t.shape[-1]))
        out[f"{OPENCLIP_PREFIX}transformer.resblocks.{n_layers}.{name}"] = r.to(dtype)
    out[OPENCLIP_PREFIX + "text_projection"] = (torch.randn(hidden, hidden, generator=extra_gen) / math.sqrt(hidden)).to(dtype)
    out[OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(math.log(100.0)).to(dtype)
    return out


def openclip_to_text(ckpt, n_layers):
    """Inverse of text_to_openclip (drops the extra layer, text_projection and logit_scale)."""
    pre = "text_model."
    sd = {
        pre + "embeddings.token_embedding.weight": ckpt[OPENCLIP_PREFIX + "token_embedding.weight"],
        pre + "embeddings.position_embedding.weight": ckpt[OPENCLIP_PREFIX + "positional_embedding"],
        pre + "final_layer_norm.weight": ckpt[OPENCLIP_PREFIX + "ln_final.weight"],
        pre + "final_layer_norm.bias": ckpt[OPENCLIP_PREFIX + "ln_final.bias"],
    }
    for n in range(n_layers):
        src = f"{OPENCLIP_PREFIX}transformer.resblocks.{n}."
        dst = f"{pre}encoder.layers.{n}."
        for hf, oc in OPENCLIP_LAYER.items():
            for wb in ("weight", "bias"):
                sd[f"{dst}{hf}.{wb}"] = ckpt[f"{src}{oc}.{wb}"]
        for wb in ("weight", "bias"):
            q, k, v = ckpt[f"{src}attn.in_proj_{wb}"].chunk(3, dim=0)
            sd[f"{dst}self_attn.q_proj.{wb}"] = q
            sd[f"{dst}self_attn.k_proj.{wb}"] = k
            sd[f"{dst}self_attn.v_proj.{wb}"] = v
    return sd


def ldm_schedule_buffers(sched_cfg):
    """betas / alphas_cumprod as LatentDiffusion registers them (float64 maths, stored float32)."""
    n = sched_cfg["num_train_timesteps"]
    betas = np.linspace(sched_cfg["beta_start"] ** 0.5, sched_cfg["beta_end"] ** 0.5, n, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    prev = np.append(1.0, alphas_cumprod[:-1])
    return {
        "betas": torch.tensor(betas, dtype=torch.float32),
        "alphas_cumprod": torch.tensor(alphas_cumprod, dtype=torch.float32),
        "alphas_cumprod_prev": torch.tensor(prev, dtype=torch.float32),
    }


def write_single_file(model_id, folder, spec):
    unet_sd = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae_sd = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    text_sd = load_file(folder / "text_encoder" / "model.safetensors")
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    unet_map, vae_map = key_maps(unet_sd, unet_cfg, vae_sd, vae_cfg)
    out = {}
    for k, name in unet_map.items():
        out[name] = unet_sd[k]
    for k, (name, reshape) in vae_map.items():
        out[name] = vae_sd[k][:, :, None, None] if reshape else vae_sd[k]
    if spec["text"]["hidden_act"] == "quick_gelu":  # SD 1: HF CLIP names under cond_stage_model.transformer.
        for k, t in text_sd.items():
            out["cond_stage_model.transformer." + k] = t
        # SD 1 files carry the position_ids buffer (int64) too.
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    else:  # SD 2: OpenCLIP names
        gen = torch.Generator("cpu").manual_seed(spec["seed"] + 500)
        out.update(text_to_openclip(text_sd, gen, spec["text"]["num_hidden_layers"], spec["text"]["hidden_size"], spec["dtype"]))
    n_names = len(set(unet_map.values())) + len(set(v[0] for v in vae_map.values()))
    assert n_names == len(unet_map) + len(vae_map), "two diffusers keys map to one LDM name"
    out.update(ldm_schedule_buffers(spec["scheduler"]))
    path = CKPT / f"{model_id}-single.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"format": "pt"})
    return path, (unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg)


def read_single_file(path, unet_cfg, vae_cfg, unet_keys, vae_keys, text_layers):
    """Independent inverse: LDM single file -> the three diffusers state dicts."""
    ckpt = load_file(path)
    inv_unet = {}
    for k in unet_keys:
        inv_unet["model.diffusion_model." + unet_key_to_ldm(k, unet_cfg)] = k
    inv_vae = {}
    for k in vae_keys:
        name, reshape = vae_key_to_ldm(k, vae_cfg)
        inv_vae["first_stage_model." + name] = (k, reshape)
    unet, vae, text = {}, {}, {}
    leftovers = []
    for name, t in ckpt.items():
        if name in inv_unet:
            unet[inv_unet[name]] = t
        elif name in inv_vae:
            k, reshape = inv_vae[name]
            if reshape:
                assert t.shape[2:] == (1, 1), name
                t = t[:, :, 0, 0]
            vae[k] = t
        elif name.startswith("cond_stage_model.transformer."):
            if not name.endswith("position_ids"):
                text[name[len("cond_stage_model.transformer."):]] = t
        elif name.startswith(OPENCLIP_PREFIX):
            pass
        else:
            leftovers.append(name)
    if any(n.startswith(OPENCLIP_PREFIX) for n in ckpt):
        text = openclip_to_text(ckpt, text_layers)
    assert sorted(leftovers) == ["alphas_cumprod", "alphas_cumprod_prev", "betas"], leftovers
    return unet, vae, text


def assert_same_state(a, b, what):
    assert sorted(a) == sorted(b), f"{what}: key sets differ: {sorted(set(a) ^ set(b))[:10]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), f"{what}: {k} differs"


def crosscheck_with_diffusers_converter(path, unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, text_layers):
    """Extra check of the naming against diffusers' own single-file converter (the one
    `from_single_file` uses on real checkpoints)."""
    from diffusers.loaders import single_file_utils as sfu

    ckpt = load_file(path)
    u = sfu.convert_ldm_unet_checkpoint(dict(ckpt), unet_cfg)
    assert_same_state(u, unet_sd, "diffusers converter / UNet")
    v = sfu.convert_ldm_vae_checkpoint(dict(ckpt), vae_cfg)
    v = {k: (t if vae_sd[k].dim() == t.dim() else t.reshape(vae_sd[k].shape)) for k, t in v.items()}
    assert_same_state(v, vae_sd, "diffusers converter / VAE")
    if any(k.startswith(OPENCLIP_PREFIX) for k in ckpt):
        model = CLIPTextModel(CLIPTextConfig(num_hidden_layers=text_layers, hidden_size=text_sd["text_model.final_layer_norm.weight"].shape[0]))
        t = sfu.convert_open_clip_checkpoint(model, dict(ckpt))
        t = {k: x for k, x in t.items() if f"layers.{text_layers}." not in k and "text_projection" not in k and "logit_scale" not in k}
    else:
        t = sfu.convert_ldm_clip_checkpoint(dict(ckpt))
        t = {k: x for k, x in t.items() if not k.endswith("position_ids")}
    assert_same_state(t, text_sd, "diffusers converter / text encoder")


def pipeline_from_state_dicts(model_id, unet_sd, vae_sd, text_sd):
    """A pipeline built from the folder's configs but with weights read back from the single file."""
    pipe = load_pipeline(model_id)
    own = set(pipe.text_encoder.state_dict())
    text_sd = {(k if k in own else k[len("text_model."):]): v for k, v in text_sd.items()}
    for module, sd in ((pipe.unet, unet_sd), (pipe.vae, vae_sd), (pipe.text_encoder, text_sd)):
        fresh = {k: v.float() for k, v in sd.items()}
        module.load_state_dict(fresh, strict=True)
    return pipe


# --------------------------------------------------------------------------------------------
# Init images
# --------------------------------------------------------------------------------------------


def make_init_image(width, height):
    """Smooth gradients plus a soft disc, a bar and a rotated square, in plain numpy."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = (x + 0.5) / width, (y + 0.5) / height
    r = 0.15 + 0.70 * u
    g = 0.20 + 0.55 * v
    b = 0.55 + 0.30 * np.sin(2 * np.pi * (0.7 * u + 0.4 * v))
    img = np.stack([r, g, b], -1)

    def paint(mask, color):
        nonlocal img
        mask = np.clip(mask, 0.0, 1.0)[..., None]
        img = img * (1 - mask) + np.array(color) * mask

    s = min(width, height)
    dist = np.hypot(x - 0.34 * width, y - 0.38 * height)
    paint(0.22 * s - dist + 0.5, (0.95, 0.80, 0.15))  # disc with a one-pixel soft edge
    paint(np.minimum(3.0 - np.abs(y - 0.78 * height), 1.0) * (x > 0.1 * width), (0.10, 0.15, 0.35))  # bar
    cx, cy = 0.70 * width, 0.42 * height
    rot = (np.abs((x - cx) + (y - cy)) + np.abs((x - cx) - (y - cy))) / np.sqrt(2)
    paint(0.14 * s - rot + 0.5, (0.85, 0.20, 0.30))  # square rotated by 45 degrees
    return Image.fromarray(np.clip(np.round(img * 255), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

PROMPT = "a photo of a cat, ((cinematic lighting))"


def img2img_case(name, model, scheduler, seed, **kw):
    case = dict(
        name=name,
        model=model,
        pipeline="img2img",
        prompt=PROMPT,
        negative_prompt="blurry",
        init_image="init-64.png",
        width=64,
        height=64,
        samples=1,
        num_inference_steps=10,
        guidance_scale=7.5,
        strength=0.75,
        image_guidance_scale=None,
        seed=seed,
        scheduler=scheduler,
        use_karras_sigmas=None,
        algorithm_type=None,
        clip_skip=1,
    )
    case.update(kw)
    return case


def pix2pix_case(name, scheduler, **kw):
    case = dict(
        name=name,
        model="pix2pix-tiny",
        pipeline="pix2pix",
        prompt="turn it into a painting",
        negative_prompt=None,
        init_image="init-64.png",
        width=64,
        height=64,
        samples=1,
        num_inference_steps=10,
        guidance_scale=7.5,
        strength=None,
        image_guidance_scale=1.5,
        seed=3,
        scheduler=scheduler,
        use_karras_sigmas=None,
        algorithm_type=None,
        clip_skip=1,
    )
    case.update(kw)
    return case


CASE_NOTES = {
    "sd1-euler": "The SD 1.5 scheduler config has no timestep_spacing, so from_config gives Euler its own default "
                 "'linspace' (timesteps 999, 888, ...), not PNDM's 'leading'.",
    "sd1-pndm": "PNDM (PLMS, skip_prk_steps) repeats its second timestep ([t0, t1, t1, t2, ...]); img2img slices "
                "that list at t_start, and PNDM's step counter (not the timestep) decides which multistep formula "
                "each call uses.",
    "clipskip": "Pictor clip_skip 2 = diffusers clip_skip 1: the positive prompt uses hidden_states[-2] followed by "
                "final_layer_norm; diffusers encodes the negative prompt WITHOUT clip skip. (The script computes "
                "the embeddings the way diffusers does, because diffusers 0.42's clip_skip path calls "
                "text_encoder.text_model, which transformers 5's CLIPTextModel no longer has.)",
    "noneg": "negative_prompt null: diffusers encodes \"\" for the unconditional half.",
    "strength1": "strength 1.0 still starts from the init latents noised to the first timestep (876), not from "
                 "pure noise.",
    "cfg1": "guidance_scale 1.0: no classifier-free guidance (diffusers needs guidance_scale > 1): the negative "
            "prompt is not encoded and the UNet batch holds only the samples.",
    "sd2": "72x56 with a VAE scale factor of 4: latents 18x14; the UNet downsamples to 9x7 and 5x4 and upsamples "
           "back to the skip connections' sizes (diffusers passes upsample_size when a size is not a multiple "
           "of 4). v-prediction, attention upcast, linear proj_in/proj_out.",
    "p2p": "InstructPix2Pix: full schedule (no strength); latents = randn * init_noise_sigma (from the sigmas after "
           "set_timesteps); image latents = VAE posterior mode, unscaled, concatenated on channels; CFG batch "
           "[text, image-only, unconditional] with image latents [img, img, zeros].",
    "p2p-ddim": "DDIMScheduler.from_config(the pix2pix EulerAncestral config): clip_sample and set_alpha_to_one "
                "are not in that file, so DDIM's own defaults (True, True) apply: x0 is clipped to [-1, 1].",
    "single": "Single-file checkpoint: the loader must give exactly the folder model; expected output is that of "
              "the same_as case.",
}


def notes_for(name):
    keys = [k for k in CASE_NOTES if k in name]
    if "euler" in name and name.startswith("sd1"):
        keys.append("sd1-euler")
    return [CASE_NOTES[k] for k in dict.fromkeys(keys)]


def all_cases():
    cases = []
    for short, cls in (("ddim", "DDIMScheduler"), ("pndm", "PNDMScheduler"), ("euler", "EulerDiscreteScheduler"),
                       ("eulera", "EulerAncestralDiscreteScheduler")):
        cases.append(img2img_case(f"sd1-{short}-s42", "sd1-tiny", cls, 42))
    pndm = dict(num_inference_steps=8, strength=0.6, samples=2)
    cases += [
        img2img_case("sd1-pndm-s0-n2", "sd1-tiny", "PNDMScheduler", 0, **pndm),
        img2img_case("sd1-pndm-s4139316548-n2", "sd1-tiny", "PNDMScheduler", 4139316548, **pndm),
        img2img_case("sd1-pndm-clipskip2-s0-n2", "sd1-tiny", "PNDMScheduler", 0, **dict(pndm, clip_skip=2)),
        img2img_case("sd1-pndm-noneg-s0-n2", "sd1-tiny", "PNDMScheduler", 0, **dict(pndm, negative_prompt=None)),
        img2img_case("sd1-pndm-strength1-s0-n2", "sd1-tiny", "PNDMScheduler", 0, **dict(pndm, strength=1.0)),
        img2img_case("sd1-pndm-cfg1-s0-n2", "sd1-tiny", "PNDMScheduler", 0, **dict(pndm, guidance_scale=1.0)),
    ]
    sd2 = dict(init_image="init-72x56.png", width=72, height=56, num_inference_steps=12, strength=0.8, guidance_scale=6.0)
    cases += [
        img2img_case("sd2-ddim-s7-n2", "sd2-tiny", "DDIMScheduler", 7, **dict(sd2, samples=2)),
        img2img_case("sd2-euler-s7", "sd2-tiny", "EulerDiscreteScheduler", 7, **sd2),
        img2img_case("sd2-eulera-s7", "sd2-tiny", "EulerAncestralDiscreteScheduler", 7, **sd2),
    ]
    cases += [
        pix2pix_case("p2p-eulera-s3", "EulerAncestralDiscreteScheduler"),
        pix2pix_case("p2p-ddim-s3", "DDIMScheduler"),
        pix2pix_case("p2p-euler-s3", "EulerDiscreteScheduler"),
        pix2pix_case("p2p-eulera-neg-s3-n2", "EulerAncestralDiscreteScheduler", samples=2,
                     negative_prompt="blurry, low quality"),
    ]
    # Every other scheduler end to end, on an epsilon (sd1) and a v-prediction (sd2) model, with Karras
    # sigmas where the class takes them; odd step counts; DPM++ 2M SDE through algorithm_type.
    sd1_more = dict(num_inference_steps=6, strength=0.75)
    sd2_more = dict(sd2, num_inference_steps=7, strength=0.6)
    for short, cls, karras in MORE_SCHEDULERS:
        cases.append(img2img_case(f"sd1-{short}-s11", "sd1-tiny", cls, 11, **sd1_more))
        cases.append(img2img_case(f"sd2-{short}-s5", "sd2-tiny", cls, 5, **sd2_more))
        if karras:
            cases.append(img2img_case(f"sd1-{short}-karras-s11", "sd1-tiny", cls, 11,
                                      **dict(sd1_more, use_karras_sigmas=True)))
            cases.append(img2img_case(f"sd2-{short}-karras-s5", "sd2-tiny", cls, 5,
                                      **dict(sd2_more, use_karras_sigmas=True)))
    for model, seed, more in (("sd1-tiny", 11, sd1_more), ("sd2-tiny", 5, sd2_more)):
        tag = model.split("-")[0]
        cases.append(img2img_case(f"{tag}-dpm2msde-karras-s{seed}", model, "DPMSolverMultistepScheduler", seed,
                                  **dict(more, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")))
    return cases


class Recorder:
    """Hooks into one pipeline call to capture intermediates."""

    def __init__(self, pipe, samples):
        self.t = {}
        self.timesteps = []
        self.pipe = pipe
        self.samples = samples
        self._undo = []

    def _wrap(self, obj, attr, make):
        orig = getattr(obj, attr)
        setattr(obj, attr, make(orig))
        self._undo.append((obj, attr, orig))

    def __enter__(self):
        pipe, t = self.pipe, self.t

        def encode(orig):
            def f(x, *a, **kw):
                out = orig(x, *a, **kw)
                t.setdefault("posterior_mean", out.latent_dist.mean.detach().clone())
                t.setdefault("posterior_std", out.latent_dist.std.detach().clone())
                return out
            return f

        def add_noise(orig):
            def f(original, noise, timesteps):
                t["init_latents"] = original.detach().clone()
                t["noise"] = noise.detach().clone()
                return orig(original, noise, timesteps)
            return f

        def scale_input(orig):
            def f(sample, timestep=None, *a, **kw):
                if "latents_start" not in t:
                    n = self.samples
                    t["latents_start"] = sample[:n].detach().clone()
                return orig(sample, timestep, *a, **kw)
            return f

        def unet_forward(orig):
            def f(sample, timestep, encoder_hidden_states=None, *a, **kw):
                if "prompt_embeds" not in t:
                    t["prompt_embeds"] = encoder_hidden_states.detach().clone()
                return orig(sample, timestep, encoder_hidden_states, *a, **kw)
            return f

        self._wrap(pipe.vae, "encode", encode)
        self._wrap(pipe.scheduler, "add_noise", add_noise)
        self._wrap(pipe.scheduler, "scale_model_input", scale_input)
        self._wrap(pipe.unet, "forward", unet_forward)
        return self

    def __exit__(self, *exc):
        for obj, attr, _ in reversed(self._undo):
            delattr(obj, attr)  # drops the instance-level wrapper, the class method shows through again

    def callback(self, pipe, i, timestep, kw):
        self.timesteps.append(float(timestep))
        self.t[f"latents_step_{i}"] = kw["latents"].detach().clone()
        return {}


# randn_tensor draws in the dtype of the latents; for the float64 precision check the noise must be
# the float32 noise, so every module that imported randn_tensor gets a float32-drawing wrapper.
_RANDN_MODULES = [
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_instruct_pix2pix",
    "diffusers.models.autoencoders.vae",
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "diffusers.schedulers.scheduling_ddim",
]


class Float32Noise:
    def __enter__(self):
        self.saved = []
        for name in _RANDN_MODULES:
            mod = importlib.import_module(name)
            orig = mod.randn_tensor

            def f(shape, generator=None, device=None, dtype=None, layout=None, _orig=orig):
                return _orig(shape, generator=generator, device=device, dtype=torch.float32, layout=layout).to(dtype)

            self.saved.append((mod, orig))
            mod.randn_tensor = f
        return self

    def __exit__(self, *exc):
        for mod, orig in self.saved:
            mod.randn_tensor = orig


def clip_skip_embeds(pipe, case):
    def ids(text):
        return pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    with torch.no_grad():
        out = pipe.text_encoder(ids(case["prompt"]), output_hidden_states=True)
        diffusers_clip_skip = case["clip_skip"] - 1
        pos = pipe.text_encoder.final_layer_norm(out.hidden_states[-(diffusers_clip_skip + 1)])
        neg = pipe.text_encoder(ids(case["negative_prompt"] or ""))[0]
    return dict(prompt_embeds=pos, negative_prompt_embeds=neg)


def call_kwargs(pipe, case, base_config):
    """Sets the case's scheduler (from the model's config, with the case's overrides) on `pipe` and returns
    the pipeline-call arguments every pipeline takes."""
    overrides = {k: case[k] for k in ("use_karras_sigmas", "algorithm_type") if case.get(k) is not None}
    pipe.scheduler = SCHEDULERS[case["scheduler"]].from_config(base_config, **overrides)
    image = Image.open(FIX / case["init_image"]).convert("RGB")
    assert image.size == (case["width"], case["height"])
    return dict(
        prompt=case["prompt"],
        image=image,
        negative_prompt=case["negative_prompt"],
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        num_images_per_prompt=case["samples"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        output_type="np",
    )


def run_case(pipe, case, base_config):
    kw = call_kwargs(pipe, case, base_config)
    if case["pipeline"] == "img2img":
        kw["strength"] = case["strength"]
        if case["clip_skip"] > 1:
            if hasattr(pipe.text_encoder, "text_model"):  # transformers 4
                kw["clip_skip"] = case["clip_skip"] - 1
            else:
                # diffusers 0.42's clip_skip path calls text_encoder.text_model.final_layer_norm, which
                # transformers 5's CLIPTextModel no longer has. Do exactly what it does, by hand:
                # positive prompt -> hidden_states[-(clip_skip + 1)] -> final_layer_norm; the negative
                # prompt is encoded WITHOUT clip skip (diffusers' behaviour).
                kw.update(clip_skip_embeds(pipe, case))
                del kw["prompt"], kw["negative_prompt"]
    else:
        kw["image_guidance_scale"] = case["image_guidance_scale"]
        assert case["clip_skip"] == 1
    rec = Recorder(pipe, case["samples"])
    with rec:
        out = pipe(**kw, callback_on_step_end=rec.callback, callback_on_step_end_tensor_inputs=["latents"]).images
    tensors = rec.t
    if case["pipeline"] == "pix2pix":
        tensors["image_latents"] = tensors.pop("posterior_mean")  # pix2pix uses the posterior mode
        tensors.pop("posterior_std")
    tensors["timesteps"] = torch.tensor(rec.timesteps, dtype=torch.float32)
    if hasattr(pipe.scheduler, "sigmas"):
        tensors["scheduler_sigmas"] = pipe.scheduler.sigmas.detach().clone()
    tensors["scheduler_timesteps"] = pipe.scheduler.timesteps.detach().clone()
    tensors["image"] = torch.from_numpy(np.ascontiguousarray(out))
    return out, tensors, rec.timesteps


def to_png(arr):
    # exactly diffusers' numpy_to_pil: (images * 255).round().astype("uint8")
    return Image.fromarray((arr * 255).round().astype("uint8"))


def generate_cases(pipes, precision_check):
    cases_dir = FIX / "cases"
    if cases_dir.exists():
        shutil.rmtree(cases_dir)
    cases = all_cases()
    records = []
    precision = {}
    for case in cases:
        pipe, base_config = pipes[case["model"]]
        out, tensors, timesteps = run_case(pipe, case, base_config)
        d = cases_dir / case["name"]
        d.mkdir(parents=True)
        paths = []
        for i, arr in enumerate(out):
            to_png(arr).save(d / f"{i}.png")
            paths.append(f"cases/{case['name']}/{i}.png")
        save_file({k: v.float().contiguous() for k, v in sorted(tensors.items())}, d / "tensors.safetensors",
                  metadata={"format": "pt"})
        rec = dict(case, images=paths, tensors=f"cases/{case['name']}/tensors.safetensors", notes=notes_for(case["name"]),
                   timesteps=[int(x) if float(x).is_integer() else x for x in timesteps])
        records.append(rec)
        print(f"  {case['name']:<32} mean {out.mean():.3f} std {out.std():.3f} "
              f"saturated {np.mean((out <= 0) | (out >= 1)):.3f} steps {len(timesteps)}", flush=True)
        if precision_check:
            pipe.to(torch.float64)
            with Float32Noise():
                out64, _, _ = run_case(pipe, case, base_config)
            pipe.to(torch.float32)
            diff = np.abs(out.astype(np.float64) - out64) * 255
            png_diff = np.abs((out * 255).round() - (out64 * 255).round())
            precision[case["name"]] = dict(max_abs_255=float(diff.max()), mean_abs_255=float(diff.mean()),
                                           png_pixels_differing=int((png_diff > 0).sum()),
                                           png_max_diff=int(png_diff.max()))
            print(f"    float64 vs float32: {precision[case['name']]}", flush=True)
    return records, precision


def verify_scheduler_differences(records):
    """The UNet must matter: the same seed under different schedulers must give different images."""
    def load(r):
        return np.asarray(Image.open(FIX / r["images"][0]), dtype=np.float64) / 255

    by_name = {r["name"]: r for r in records}
    groups = [["sd1-ddim-s42", "sd1-pndm-s42", "sd1-euler-s42", "sd1-eulera-s42"],
              ["sd2-ddim-s7-n2", "sd2-euler-s7", "sd2-eulera-s7"],
              ["p2p-eulera-s3", "p2p-ddim-s3", "p2p-euler-s3"],
              ["sd1-pndm-s0-n2", "sd1-pndm-s4139316548-n2", "sd1-pndm-clipskip2-s0-n2", "sd1-pndm-noneg-s0-n2",
               "sd1-pndm-strength1-s0-n2", "sd1-pndm-cfg1-s0-n2"]]
    for g in groups:
        imgs = [load(by_name[n]) for n in g]
        for i in range(len(g)):
            assert imgs[i].std() > 0.05, f"{g[i]} is nearly flat"
            for j in range(i + 1, len(g)):
                d = np.abs(imgs[i] - imgs[j]).mean()
                print(f"  mean |{g[i]} - {g[j]}| = {d:.3f}")
                assert d > 0.005, f"{g[i]} and {g[j]} are nearly identical"


# --------------------------------------------------------------------------------------------
# RNG and tokenizer fixtures
# --------------------------------------------------------------------------------------------


def f32_list(t):
    return [float(x) for x in t.detach().to(torch.float32).reshape(-1).tolist()]


def write_rng_fixture():
    seeds = [0, 1, 42, 4139316548, 2**32 + 5, 2**40 + 123, 5, 123]
    sizes = [1, 3, 15, 16, 17, 33, 64, 100, 1000]
    randn = []
    for seed in seeds:
        for size in sizes:
            g = torch.Generator("cpu").manual_seed(seed)
            randn.append(dict(seed=seed, size=size, values=f32_list(torch.randn(size, generator=g))))
    g = torch.Generator("cpu").manual_seed(42)
    sequence = [dict(size=n, values=f32_list(torch.randn(n, generator=g))) for n in (3, 5, 20, 7)]
    g = torch.Generator("cpu").manual_seed(1234)
    shaped = f32_list(torch.randn((2, 4, 9, 9), generator=g))
    write_json(
        FIX / "rng.json",
        {
            "about": "torch.randn(size, generator=torch.Generator('cpu').manual_seed(seed)), dtype float32. "
                     "Seeds 5 and 123 are included to show that seeds are reduced to their low 32 bits. "
                     "'sequence' is one generator drawing randn(3), randn(5), randn(20), randn(7) in turn; "
                     "sizes below 16 take torch's scalar (double Box-Muller, cached second value) path, "
                     "16 and more the 16-wide vectorised float path.",
            "torch_version": torch.__version__,
            "dtype": "float32",
            "randn": randn,
            "sequence": {"seed": 42, "draws": sequence},
            "shaped": {"seed": 1234, "shape": [2, 4, 9, 9], "values": shaped},
        },
        indent=None,
    )


TOKENIZER_PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "a photo of a cat, ((cinematic lighting))",
    "((cinematic lighting)), f/1.4, ISO 200, 1/160s, 8K",
    "it's the cat's toy, isn't it? we'll see, they're here, I'd go, you've won, I'm in",
    "12345 67890 3.14159 1,000,000 2024-01-01 #1 No.9",
    "café naïve résumé Ångström façade",
    "東京の夜景、美しい 風景",
    "고양이 사진",
    "a cat 🐱 with a hat 🎩✨",
    "multiple   spaces\tand\ttabs\nand\n\nnewlines",
    "   leading and trailing whitespace   ",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot;",
    "(red:1.3) [blue] BREAK green",
    "<lora:foo:0.8> masterpiece, best quality, {a|b}",
    "an astronaut riding a horse on mars, artstation, hd, dramatic lighting, detailed",
    "hello-world snake_case camelCase kebab-case",
    "dog.cat,bird;fish:horse!mouse?",
    "!!!???...,,,;;;",
    "<|startoftext|>a photo<|endoftext|>",
    "straße ǅ ﬁne İstanbul",
    "Ünïcödé ÀÉÎÕÜ",
    "x" * 60,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "",
    " ",
    "a",
    "photo of a beautiful woman, (masterpiece:1.2), (best quality), ultra-detailed, 8k uhd, dslr, soft lighting, "
    "high quality, film grain, Fujifilm XT3",
    " ".join(  # 120 words, well over 77 tokens
        (("the quick brown fox jumps over the lazy dog while a painter named Alice carefully mixes bright colours "
         "on her wooden palette near an old stone bridge covered in ivy under a cloudy autumn sky with birds flying "
         "south as children play football in the park beside a quiet river where boats drift slowly past tall "
         "trees and small cottages with red roofs and smoking chimneys on a cold evening, and later that night "
         "the stars come out one by one above the sleeping village").split() * 2)[:120]
    ),
    "portrait\u00a0with\u00a0nbsp and zero\u200bwidth",
]


def write_tokenizer_fixture(folders):
    tok_eot = CLIPTokenizer.from_pretrained(TOKENIZER_ASSETS, pad_token="<|endoftext|>", model_max_length=77)
    tok_bang = CLIPTokenizer.from_pretrained(TOKENIZER_ASSETS, pad_token="!", model_max_length=77)
    # The tokenizers saved with the models must behave identically.
    from_sd1 = CLIPTokenizer.from_pretrained(folders["sd1-tiny"] / "tokenizer")
    from_sd2 = CLIPTokenizer.from_pretrained(folders["sd2-tiny"] / "tokenizer")
    try:
        import ftfy  # noqa: F401

        ftfy_installed = True
    except ImportError:
        ftfy_installed = False
    entries = []
    for p in TOKENIZER_PROMPTS:
        padded_eot = tok_eot(p, padding="max_length", max_length=77, truncation=True).input_ids
        padded_bang = tok_bang(p, padding="max_length", max_length=77, truncation=True).input_ids
        assert from_sd1(p, padding="max_length", max_length=77, truncation=True).input_ids == padded_eot
        assert from_sd2(p, padding="max_length", max_length=77, truncation=True).input_ids == padded_bang
        entries.append(
            dict(
                prompt=p,
                ids=tok_eot(p).input_ids,
                padded_endoftext=padded_eot,
                padded_bang=padded_bang,
                tokens=tok_eot.convert_ids_to_tokens(tok_eot(p).input_ids),
            )
        )
    write_json(
        FIX / "tokenizer.json",
        {
            "about": "CLIPTokenizer ids from assets/clip-tokenizer. 'ids': tokenizer(p).input_ids (no padding, "
                     "no truncation); 'padded_endoftext' / 'padded_bang': padding='max_length', max_length=77, "
                     "truncation=True with pad token '<|endoftext|>' (SD 1) or '!' (SD 2).",
            "transformers_version": transformers.__version__,
            "implementation": type(tok_eot).__name__ + " from transformers " + transformers.__version__
            + ": transformers 5 has no pure-Python ('slow') CLIP tokenizer any more; this is the "
              "tokenizers-backed one that diffusers uses with this transformers version (normalizer: NFC, "
              "collapse whitespace runs to one space, lowercase; pre-tokenizer: CLIP's regex, then byte-level)",
            "ftfy_installed": ftfy_installed,
            "bos_id": tok_eot.bos_token_id,
            "eos_id": tok_eot.eos_token_id,
            "pad_id_endoftext": tok_eot.pad_token_id,
            "pad_id_bang": tok_bang.pad_token_id,
            "cases": entries,
        },
    )


# --------------------------------------------------------------------------------------------
# Docs
# --------------------------------------------------------------------------------------------

SINGLE_FILE_MD = """# Single-file checkpoints (original LDM naming)

`checkpoints/sd1-tiny-single.safetensors` and `checkpoints/sd2-tiny-single.safetensors` hold exactly
the weights of the `sd1-tiny` / `sd2-tiny` folders (same dtype: float16 / bfloat16), renamed the way
CompVis / Stability checkpoints (and CivitAI / A1111 files derived from them) name them. Loading one
must give the same images as the folder; `cases.json` has a case for each that points at the
folder case's expected images. `scripts/make_fixtures.py` writes them with its own mapping, reads
them back with its own inverse, checks every tensor is identical, and also cross-checks against
diffusers' single-file converter.

What the file does not say and a loader has to assume (the tiny models follow the real conventions):
SD 1 (text encoder under `cond_stage_model.transformer.`): CLIP ViT-L style text model with
`quick_gelu`, 12 attention heads; UNet attention with 8 heads per block; epsilon prediction;
PNDM scheduler config of SD 1.5; pad token `<|endoftext|>`. SD 2 (text encoder under
`cond_stage_model.model.`): OpenCLIP text tower with exact `gelu`, 16 heads, drop the last
resblock; UNet attention with 64 channels per head, linear proj_in/proj_out (2-D weights),
upcast attention; v-prediction; DDIM scheduler config of SD 2.1; pad token `!`. Both: VAE
`scaling_factor` 0.18215, one attention head in the VAE mid block; block counts, channels,
layers per block, which blocks have attention, latent/in channels and the VAE scale factor
(2^(levels-1)) all follow from the tensor names and shapes. Tell SD 1 from SD 2 by the text-encoder
prefix, not by widths: diffusers' own heuristic (cross-attention width 1024 means SD 2) does not hold
for these tiny models (48 and 64).

Top level: `betas`, `alphas_cumprod`, `alphas_cumprod_prev` (float32, 1000 entries, scaled-linear
0.00085..0.012) as real files carry them; a loader may ignore them.

## UNet: `model.diffusion_model.`

`L` = layers_per_block. Down block `i` occupies `input_blocks` slots `1 + i*(L+1)` .. `1 + i*(L+1) + L`;
up block `i` occupies `output_blocks` slots `i*(L+1)` .. `i*(L+1) + L` (up blocks have `L+1` resnets).

| diffusers | LDM |
|---|---|
| `time_embedding.linear_1` / `linear_2` | `time_embed.0` / `time_embed.2` |
| `conv_in` | `input_blocks.0.0` |
| `down_blocks.i.resnets.j` | `input_blocks.{1+i*(L+1)+j}.0` |
| `down_blocks.i.attentions.j` | `input_blocks.{1+i*(L+1)+j}.1` |
| `down_blocks.i.downsamplers.0.conv` | `input_blocks.{1+i*(L+1)+L}.0.op` |
| `mid_block.resnets.0` / `attentions.0` / `resnets.1` | `middle_block.0` / `.1` / `.2` |
| `up_blocks.i.resnets.j` | `output_blocks.{i*(L+1)+j}.0` |
| `up_blocks.i.attentions.j` | `output_blocks.{i*(L+1)+j}.1` |
| `up_blocks.i.upsamplers.0.conv` | `output_blocks.{i*(L+1)+L}.1.conv` if that up block has no attention, else `.2.conv` |
| `conv_norm_out` / `conv_out` | `out.0` / `out.2` |

Inside a ResNet block: `norm1`->`in_layers.0`, `conv1`->`in_layers.2`, `time_emb_proj`->`emb_layers.1`,
`norm2`->`out_layers.0`, `conv2`->`out_layers.3`, `conv_shortcut`->`skip_connection`.
Inside an attention (Transformer2D) block the names are the same on both sides (`norm`, `proj_in`,
`transformer_blocks.k.{norm1,attn1.to_q,...,attn1.to_out.0,norm2,attn2.*,norm3,ff.net.0.proj,ff.net.2}`,
`proj_out`). SD 1 has 1x1-conv `proj_in`/`proj_out` (4-D), SD 2 linear ones (2-D) on both sides.

## VAE: `first_stage_model.`

| diffusers | LDM |
|---|---|
| `encoder.conv_in`, `encoder.conv_out` (same for decoder) | same |
| `encoder.conv_norm_out` | `encoder.norm_out` |
| `encoder.down_blocks.i.resnets.j` | `encoder.down.i.block.j` |
| `encoder.down_blocks.i.downsamplers.0.conv` | `encoder.down.i.downsample.conv` |
| `decoder.up_blocks.i.resnets.j` | `decoder.up.{n-1-i}.block.j` (LDM counts decoder levels from full resolution; n = number of levels) |
| `decoder.up_blocks.i.upsamplers.0.conv` | `decoder.up.{n-1-i}.upsample.conv` |
| `*.mid_block.resnets.0` / `.1` | `*.mid.block_1` / `block_2` |
| `*.mid_block.attentions.0.group_norm` | `*.mid.attn_1.norm` |
| `*.mid_block.attentions.0.to_q` / `to_k` / `to_v` / `to_out.0` | `*.mid.attn_1.q` / `k` / `v` / `proj_out`; weights are 1x1 convs `[C, C, 1, 1]` in LDM, `[C, C]` in diffusers |
| `quant_conv`, `post_quant_conv` | same |

Inside VAE ResNet blocks the names match except `conv_shortcut` -> `nin_shortcut`.

## Text encoder

SD 1: `cond_stage_model.transformer.` + the Hugging Face CLIPTextModel name
(`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.N.self_attn.q_proj.weight`, ...).
The file also carries `cond_stage_model.transformer.text_model.embeddings.position_ids`
(int64 `[1, 77]`, 0..76) as SD 1 checkpoints do; it is not a weight.

SD 2 (OpenCLIP), prefix `cond_stage_model.model.`:

| diffusers (`text_model.`) | OpenCLIP |
|---|---|
| `embeddings.token_embedding.weight` | `token_embedding.weight` |
| `embeddings.position_embedding.weight` | `positional_embedding` (same `[77, hidden]` shape) |
| `encoder.layers.N.layer_norm1` / `layer_norm2` | `transformer.resblocks.N.ln_1` / `ln_2` |
| `encoder.layers.N.self_attn.{q,k,v}_proj.weight` | `transformer.resblocks.N.attn.in_proj_weight` = rows [q; k; v], shape `[3*hidden, hidden]` |
| `encoder.layers.N.self_attn.{q,k,v}_proj.bias` | `transformer.resblocks.N.attn.in_proj_bias` = [q; k; v] |
| `encoder.layers.N.self_attn.out_proj` | `transformer.resblocks.N.attn.out_proj` |
| `encoder.layers.N.mlp.fc1` / `fc2` | `transformer.resblocks.N.mlp.c_fc` / `c_proj` |
| `final_layer_norm` | `ln_final` |

The file has one more resblock than the diffusers model (`resblocks.3` here, `resblocks.23` in real
SD 2 files): SD 2 conditions on the penultimate OpenCLIP layer, followed by `ln_final`, so the last
resblock is unused and must be dropped. `text_projection` (`[hidden, hidden]`, random) and
`logit_scale` (scalar) are unused too.
"""


def write_readme(model_sizes):
    lines = [
        "# Reference fixtures",
        "",
        "Written by `scripts/make_fixtures.py` (run by hand: `/work/venv/bin/python scripts/make_fixtures.py`",
        "from the repository root; `--no-precision-check` skips `precision.json`). Do not edit by hand.",
        "",
        f"Generated with torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
        f"{transformers.__version__}, safetensors {safetensors.__version__}, numpy {np.__version__}, CPU, float32, one thread.",
        "",
        "| path | what |",
        "|---|---|",
        "| `models/checkpoints/sd1-tiny/` | SD 1-like pipeline, epsilon, PNDM (SD 1.5 config), weights float16 |",
        "| `models/checkpoints/sd2-tiny/` | SD 2-like pipeline, v-prediction, DDIM (SD 2.1 config), linear proj, upcast attention, per-block head counts, 3-level VAE (scale factor 4), pad token `!`, weights bfloat16 |",
        "| `models/checkpoints/pix2pix-tiny/` | InstructPix2Pix pipeline (UNet in_channels 8), Euler ancestral, weights float32 |",
        "| `models/checkpoints/sd1-tiny-single.safetensors`, `sd2-tiny-single.safetensors` | the sd1/sd2 weights in original LDM naming, see `models/SINGLE_FILE.md` |",
        "| `init-64.png`, `init-72x56.png` | init images (64x64, 72 wide x 56 high) |",
        "| `cases.json` | one object per reference generation (fields below) |",
        "| `cases/<name>/<i>.png` | expected images: diffusers' float output, `(x*255).round()` as uint8 |",
        "| `cases/<name>/tensors.safetensors` | float32 intermediates of the same run (below) |",
        "| `rng.json` | `torch.randn` values for seeds/sizes, a multi-draw sequence and a shaped draw |",
        "| `tokenizer.json` | CLIP token ids for ~30 prompts: raw, padded with `<|endoftext|>`, padded with `!` |",
        "| `precision.json` | per case, how much the image moves when the same run is done in float64: the tolerance a correct float32 port can meet (at most 1 PNG level on a few pixels here) |",
        "",
        "Model sizes: " + ", ".join(f"`{k}` {v / 1e6:.1f} MB" for k, v in model_sizes.items()) + ".",
        "",
        "## cases.json",
        "",
        "`name`, `model` (folder or file name under `models/checkpoints/`), `pipeline` (`img2img` =",
        "StableDiffusionImg2ImgPipeline, `pix2pix` = StableDiffusionInstructPix2PixPipeline), `prompt`,",
        "`negative_prompt` (null = none, which diffusers treats as \"\"), `init_image` (relative to this",
        "folder, already at `width` x `height`), `samples` (num_images_per_prompt), `num_inference_steps`,",
        "`guidance_scale`, `strength` (img2img, else null), `image_guidance_scale` (pix2pix, else null),",
        "`seed` (`torch.Generator(\"cpu\").manual_seed(seed)`, one generator for the whole call), `scheduler`",
        "(diffusers class, built with `from_config(<model's scheduler_config.json>)`), `clip_skip` (Pictor /",
        "A1111 convention: 1 = last layer; diffusers' `clip_skip` = this - 1), `images`, `tensors`, and",
        "`timesteps` (the UNet timesteps actually run), `notes` (diffusers behaviours the case exercises).",
        "Cases with `same_as` (single-file models) reuse the expected images and tensors of that folder case.",
        "",
        "## tensors.safetensors",
        "",
        "- `prompt_embeds`: the text conditioning exactly as passed to the UNet: img2img with CFG",
        "  `[negative x samples, positive x samples]`, without CFG (guidance_scale <= 1) `[positive x samples]`;",
        "  pix2pix `[positive x samples, negative x samples, negative x samples]`.",
        "- `posterior_mean`, `posterior_std` (img2img): VAE encoder's latent distribution of the init image",
        "  (unscaled); `init_latents` = scaling_factor * (mean + std * randn), before noise is added;",
        "  `noise`: the noise handed to `scheduler.add_noise`.",
        "- `image_latents` (pix2pix): the VAE posterior mode (mean) of the init image, *not* scaled by",
        "  scaling_factor, shape `[1, 4, h, w]` (the UNet sees it repeated per sample, zeros for the",
        "  unconditional third of the batch).",
        "- `latents_start`: latents entering the first UNet call, before `scale_model_input`.",
        "- `latents_step_<k>`: latents after scheduler step k (0-based, one per UNet call).",
        "- `timesteps`: timesteps actually run; `scheduler_timesteps` / `scheduler_sigmas`: the scheduler's",
        "  full schedule after `set_timesteps` (sigmas only for schedulers that have them).",
        "- `image`: the pipeline's float output `[samples, H, W, 3]` in [0, 1], before PNG quantisation.",
        "",
        "## Weights",
        "",
        "Random, not trained: Linear/Conv weights N(0, 1/fan_in) (q/k x1.5, ResNet time projections x2),",
        "3x3 kernels 90% blur-shaped random + white noise, jittered norms, biases N(0, 0.05^2), token",
        "embeddings N(0,1), position embeddings N(0, 0.25); the VAE quant_conv mean rows are scaled x8",
        "(post_quant_conv /8) and the log-variance bias set to -2. Drawn in float32, rounded to the",
        "storage dtype, saved; references run in float32 on the rounded values.",
        "",
    ]
    (FIX / "README.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------


def dir_size(p):
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-precision-check", dest="precision_check", action="store_false",
                    help="skip re-running every case in float64 (precision.json is then removed)")
    args = ap.parse_args()

    FIX.mkdir(parents=True, exist_ok=True)
    print("init images", flush=True)
    make_init_image(64, 64).save(FIX / "init-64.png")
    make_init_image(72, 56).save(FIX / "init-72x56.png")

    print("models", flush=True)
    folders, pipes, model_sizes = {}, {}, {}
    for model_id, spec in MODELS.items():
        unet, vae, text = build_models(spec)
        folders[model_id] = save_pipeline_folder(model_id, spec, unet, vae, text)
        pipe = load_pipeline(model_id)
        # The loaded float32 weights must be exactly the rounded ones.
        for saved, loaded in ((unet, pipe.unet), (vae, pipe.vae), (text, pipe.text_encoder)):
            ref = saved.state_dict()
            for k, v in loaded.state_dict().items():
                assert torch.equal(v, ref[k].float()), f"{model_id}: {k} changed on reload"
        pipes[model_id] = (pipe, pipe.scheduler.config)
        model_sizes[model_id] = dir_size(folders[model_id])

    print("single files", flush=True)
    single = {}
    for model_id in ("sd1-tiny", "sd2-tiny"):
        spec = MODELS[model_id]
        path, (unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg) = write_single_file(model_id, folders[model_id], spec)
        u, v, t = read_single_file(path, unet_cfg, vae_cfg, unet_sd.keys(), vae_sd.keys(), spec["text"]["num_hidden_layers"])
        assert_same_state(u, unet_sd, f"{path.name} UNet")
        assert_same_state(v, vae_sd, f"{path.name} VAE")
        assert_same_state(t, text_sd, f"{path.name} text encoder")
        crosscheck_with_diffusers_converter(path, unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, spec["text"]["num_hidden_layers"])
        single[model_id] = (path, u, v, t)
        model_sizes[path.name] = dir_size(path)
        print(f"  {path.name}: {len(load_file(path))} tensors, round trip exact", flush=True)

    print("cases", flush=True)
    records, precision = generate_cases(pipes, args.precision_check)
    verify_scheduler_differences(records)

    # Single-file cases: same request, same expected output as a folder case. Check it in Python:
    # a pipeline whose weights come from the single file through the inverse mapping.
    by_name = {r["name"]: r for r in records}
    for model_id, ref_name in (("sd1-tiny", "sd1-ddim-s42"), ("sd2-tiny", "sd2-ddim-s7-n2")):
        path, u, v, t = single[model_id]
        ref = by_name[ref_name]
        pipe = pipeline_from_state_dicts(model_id, u, v, t)
        out, _, _ = run_case(pipe, ref, pipes[model_id][1])
        expected = np.stack([np.asarray(Image.open(FIX / p)) for p in ref["images"]])
        assert np.array_equal((out * 255).round().astype(np.uint8), expected), f"{path.name} differs from folder"
        name = ref_name.replace(model_id.split("-")[0], model_id.split("-")[0] + "-single", 1)
        records.append(dict(ref, name=name, model=path.name, same_as=ref_name, notes=notes_for(name)))
        print(f"  {name}: identical to {ref_name}", flush=True)

    write_json(FIX / "cases.json", records)
    if args.precision_check:
        write_json(FIX / "precision.json", {
            "about": "Per case: the same run in float64 (weights upcast, noise drawn in float32 then upcast) vs the "
                     "float32 reference. max_abs_255 / mean_abs_255: |difference| of the float images x 255; "
                     "png_pixels_differing / png_max_diff: after quantising both to uint8.",
            "cases": precision,
        })
    elif (FIX / "precision.json").exists():
        (FIX / "precision.json").unlink()  # would be stale

    print("rng / tokenizer", flush=True)
    write_rng_fixture()
    write_tokenizer_fixture(folders)

    (FIX / "models" / "SINGLE_FILE.md").write_text(SINGLE_FILE_MD)
    write_readme(model_sizes)
    print(f"done: {dir_size(FIX) / 1e6:.1f} MB in {FIX}", flush=True)


if __name__ == "__main__":
    main()
