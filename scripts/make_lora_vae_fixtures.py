#!/usr/bin/env python3
"""Writes the LoRA and replacement-VAE fixtures (tests/fixtures/models/{loras,vae}, tests/fixtures/lora_vae/).

Run by hand from the repository root after scripts/make_fixtures.py (never by CI; outputs are committed):

    /work/venv/bin/python scripts/make_lora_vae_fixtures.py      # ~1 minute on 2 cores

Needs torch, diffusers, transformers, peft and safetensors (CPU, no network).

What it writes:
  - models/loras/tiny-kohya.safetensors     kohya/A1111 LoRA for sd1-tiny: every UNet attention projection,
                                            proj_in/out, feed-forward, ResNet 3x3 convs (LoCon) and time
                                            projections, and the text encoder's attention and MLP; rank 4, alpha 2
  - models/loras/tiny-peft.safetensors      diffusers/PEFT-format LoRA for sd1-tiny (lora_A/lora_B), rank 2,
                                            UNet attention + text encoder q/v, alphas in the header metadata
  - models/loras/tiny-sd2-kohya.safetensors kohya LoRA for sd2-tiny (a LoRA for "another architecture" to sd1)
  - models/vae/tiny-alt/                    another tiny VAE (same architecture as sd1-tiny's, other weights),
                                            diffusers folder
  - models/vae/tiny-alt-ldm.safetensors     the same VAE in original LDM naming (A1111's VAE files)
  - lora_vae/cases.json, lora_vae/<case>/<i>.png   diffusers' img2img with those LoRAs / that VAE

diffusers applies LoRAs unmerged (PEFT layers, y = Wx + s.B(Ax)); Pictor merges them into the weights.
The two agree to float32 rounding.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
MODELS = FIX / "models"
OUT = FIX / "lora_vae"

spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts" / "make_fixtures.py")
mf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mf)

from diffusers import AutoencoderKL, PNDMScheduler  # noqa: E402


def randn(shape, gen, std):
    return (torch.randn(shape, generator=gen) * std).contiguous()


def kohya_lora(pipe, gen, rank, alpha, unet_filter, te_filter, std=0.35):
    """Random kohya-format tensors for every Linear/Conv2d module of the UNet and text encoder that the
    filters accept. up is random too (a trained LoRA's up is not zero), scaled to change images visibly."""
    out = {}
    for prefix, model, keep in (("lora_unet_", pipe.unet, unet_filter), ("lora_te_", pipe.text_encoder, te_filter)):
        for name, m in model.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not keep(name):
                continue
            # Real kohya files name text encoder layers as transformers 4 did (text_model.encoder...).
            full = name if prefix == "lora_unet_" or name.startswith("text_model.") else "text_model." + name
            key = prefix + full.replace(".", "_")
            if isinstance(m, torch.nn.Linear):
                down = randn((rank, m.in_features), gen, 1.0 / m.in_features**0.5)
                up = randn((m.out_features, rank), gen, std / rank**0.5)
            else:
                kh, kw = m.kernel_size
                fan_in = m.in_channels * kh * kw
                down = randn((rank, m.in_channels, kh, kw), gen, 1.0 / fan_in**0.5)
                up = randn((m.out_channels, rank, 1, 1), gen, std / rank**0.5)
            out[key + ".lora_down.weight"] = down
            out[key + ".lora_up.weight"] = up
            out[key + ".alpha"] = torch.tensor(float(alpha))
    return out


def unet_all(name):
    last = name.split(".")[-1]
    return (
        last in ("to_q", "to_k", "to_v", "proj_in", "proj_out", "proj", "conv1", "conv2", "time_emb_proj")
        or name.endswith("to_out.0")
        or name.endswith("ff.net.2")
    )


def te_all(name):
    return name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def peft_lora(pipe, gen, rank, alpha):
    """diffusers/PEFT naming: unet.<module>.lora_A.weight / lora_B.weight, text_encoder.<module>…; the
    alpha lives in the header metadata as diffusers writes it."""
    out = {}
    for prefix, model, keep in (
        ("unet.", pipe.unet, lambda n: n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0")),
        ("text_encoder.", pipe.text_encoder, lambda n: n.split(".")[-1] in ("q_proj", "v_proj")),
    ):
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and keep(name):
                if prefix == "text_encoder." and not name.startswith("text_model."):
                    name = "text_model." + name  # as diffusers saves it with transformers 4
                out[f"{prefix}{name}.lora_A.weight"] = randn((rank, m.in_features), gen, 1.0 / m.in_features**0.5)
                out[f"{prefix}{name}.lora_B.weight"] = randn((m.out_features, rank), gen, 0.3 / rank**0.5)
    meta = {
        "unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
        "text_encoder.r": rank, "text_encoder.lora_alpha": alpha, "text_encoder.target_modules": ["q_proj", "v_proj"],
    }
    return out, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)}


def alt_vae(gen_seed):
    """sd1-tiny's VAE architecture with weights re-drawn as make_fixtures.py draws them, other seed."""
    cfg = AutoencoderKL.load_config(MODELS / "checkpoints" / "sd1-tiny" / "vae")
    vae = AutoencoderKL.from_config(cfg)
    gen = torch.Generator("cpu").manual_seed(gen_seed)
    mf.liven(vae, gen)
    mf.scale_vae_latents(vae)
    return vae.eval()


def vae_to_ldm(vae):
    state = {}
    cfg = dict(vae.config)
    for k, v in vae.state_dict().items():
        name, reshape = mf.vae_key_to_ldm(k, cfg)
        state[name] = (v[..., None, None] if reshape else v).contiguous()
    return state


CASE = dict(
    init_image="init-64.png", width=64, height=64, prompt="a photo of a cat", negative_prompt="blurry",
    num_inference_steps=10, guidance_scale=7.5, strength=0.75, seed=42, samples=1, scheduler="PNDMScheduler",
)


def run(pipe, case):
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    image = Image.open(FIX / case["init_image"]).convert("RGB")
    out = pipe(
        prompt=case["prompt"], image=image, negative_prompt=case["negative_prompt"],
        num_inference_steps=case["num_inference_steps"], guidance_scale=case["guidance_scale"],
        strength=case["strength"], num_images_per_prompt=case["samples"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="np",
    ).images
    return out


def save_case(cases, name, model, out, **extra):
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    images = []
    for i, arr in enumerate(out):
        p = d / f"{i}.png"
        mf.to_png(arr).save(p)
        images.append(f"{name}/{i}.png")
    cases.append(dict(CASE, name=name, model=model, images=images, **extra))


def main():
    loras = MODELS / "loras"
    vaes = MODELS / "vae"
    loras.mkdir(parents=True, exist_ok=True)
    vaes.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []

    pipe = mf.load_pipeline("sd1-tiny")
    gen = torch.Generator("cpu").manual_seed(1234)
    kohya = kohya_lora(pipe, gen, rank=4, alpha=2.0, unet_filter=unet_all, te_filter=te_all)
    save_file(kohya, loras / "tiny-kohya.safetensors", metadata={"ss_network_module": "networks.lora"})
    peft, meta = peft_lora(pipe, gen, rank=2, alpha=4)
    save_file(peft, loras / "tiny-peft.safetensors", metadata=meta)

    base = run(pipe, CASE)
    pipe.load_lora_weights(str(loras), weight_name="tiny-kohya.safetensors", adapter_name="kohya")
    pipe.load_lora_weights(str(loras), weight_name="tiny-peft.safetensors", adapter_name="peft")

    def embeds():
        with torch.no_grad():
            return pipe.encode_prompt(CASE["prompt"], "cpu", 1, False)[0]

    pipe.set_adapters(["kohya"], adapter_weights=[0.8])
    kohya_embeds = embeds()
    pipe.set_adapters(["peft"], adapter_weights=[1.0])
    peft_embeds = embeds()
    pipe.disable_lora()
    plain_embeds = embeds()
    pipe.enable_lora()
    for e, what in ((kohya_embeds, "kohya"), (peft_embeds, "peft")):
        assert (e - plain_embeds).abs().max() > 0.1, f"the {what} LoRA did not reach the text encoder"
    pipe.set_adapters(["kohya"], adapter_weights=[0.8])
    one = run(pipe, CASE)
    save_case(cases, "kohya-0.8", "sd1-tiny", one, loras=[["tiny-kohya", 0.8]])
    pipe.set_adapters(["kohya", "peft"], adapter_weights=[0.6, 1.0])
    two = run(pipe, CASE)
    save_case(cases, "kohya-0.6-peft-1.0", "sd1-tiny", two, loras=[["tiny-kohya", 0.6], ["tiny-peft", 1.0]])
    for a, b, what in ((base, one, "one LoRA"), (one, two, "two LoRAs")):
        d = np.abs(a - b).max() * 255
        assert d > 20, f"{what} barely changes the image (max diff {d:.1f})"
    pipe.unload_lora_weights()

    # A LoRA for another architecture (sd2-tiny: other widths), used by the bad-input tests.
    pipe2 = mf.load_pipeline("sd2-tiny")
    sd2 = kohya_lora(pipe2, torch.Generator("cpu").manual_seed(99), 2, 2.0, unet_all, te_all)
    save_file(sd2, loras / "tiny-sd2-kohya.safetensors")

    # Replacement VAE, as a diffusers folder and as an LDM-named single file.
    vae = alt_vae(777)
    vae.save_pretrained(vaes / "tiny-alt", safe_serialization=True)
    save_file(vae_to_ldm(vae), vaes / "tiny-alt-ldm.safetensors")
    pipe = mf.load_pipeline("sd1-tiny")
    pipe.vae = AutoencoderKL.from_pretrained(vaes / "tiny-alt", torch_dtype=torch.float32)
    swapped = run(pipe, CASE)
    assert np.abs(swapped - base).max() * 255 > 20, "the other VAE barely changes the image"
    save_case(cases, "vae-tiny-alt", "sd1-tiny", swapped, vae="tiny-alt")

    mf.write_json(OUT / "cases.json", cases)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
