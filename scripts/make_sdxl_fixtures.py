#!/usr/bin/env python3
"""Writes Pictor's SDXL reference fixtures with diffusers' StableDiffusionXLImg2ImgPipeline.

Run by hand from the repository root (never by CI; the outputs are committed):

    /work/venv/bin/python scripts/make_sdxl_fixtures.py      # ~1 minute on 2 cores

Needs torch, diffusers, transformers, peft and safetensors (CPU only, no network); reuses make_fixtures.py's
weight drawing (liven), tokenizer folders and init images.

What it writes:
  - tests/fixtures/models/checkpoints/sdxl-tiny/          a tiny random SDXL base: CLIP ViT-L-shaped
        text_encoder/ (CLIPTextModel) + OpenCLIP-bigG-shaped text_encoder_2/ (CLIPTextModelWithProjection,
        pad token "!"), a 3-level UNet with addition_embed_type "text_time", transformer_layers_per_block
        per block, linear projections; a VAE with scaling_factor 0.13025; SDXL's own scheduler config
  - tests/fixtures/models/checkpoints/sdxl-refiner-tiny/  a refiner: text_encoder_2/ alone (the same
        weights as the base's, as the real refiner shares them), requires_aesthetics_score, a UNet whose
        add embedding reads 5 time ids, force_zeros_for_empty_prompt false (as the real refiner ships)
  - tests/fixtures/models/checkpoints/sdxl-turbo-tiny/    the base's weights with SDXL-Turbo's scheduler config
        (EulerAncestralDiscreteScheduler, timestep_spacing "trailing"), for few-step, guidance ≤ 1 cases
  - tests/fixtures/models/checkpoints/{sdxl-tiny,sdxl-refiner-tiny}-single.safetensors   the same weights as
        single files the way CivitAI ships SDXL: model.diffusion_model.* (add embedding as label_emb.0.*),
        first_stage_model.*, conditioner.embedders.0.transformer.* (CLIP-L, transformers names) and
        conditioner.embedders.1.model.* (OpenCLIP names, text_projection stored transposed); the refiner's one
        embedder is conditioner.embedders.0.model.*. Checked against diffusers' own from_single_file.
  - tests/fixtures/models/loras/tiny-sdxl-{peft,kohya}.safetensors   one random LoRA on the base's UNet and both
        text encoders, in diffusers/PEFT naming (unet., text_encoder., text_encoder_2.) and in sd-scripts' SDXL
        naming (lora_unet_<LDM path>, lora_te1_, lora_te2_, alpha 2 of rank 4); diffusers reads the kohya file
        with its own converter, and its images at strength s equal the PEFT file's at s / 2
  - tests/fixtures/sdxl/lora_cases.json + lora/<name>/0.png   diffusers' images with those LoRAs (the
        tests/fixtures/lora_vae/cases.json format)
  - tests/fixtures/sdxl/embeddings/sdxlstyle.safetensors   an SDXL textual-inversion embedding (clip_l 2 × 48,
        clip_g 2 × 80, random), and sdxl/embedding_cases.json + embedding/<name>/0.png: diffusers' images with it
        (loaded into both encoders as diffusers' docs do; the refiner takes clip_g alone)
  - tests/fixtures/sdxl/cases.json, tests/fixtures/sdxl/cases/<name>/{<i>.png,tensors.safetensors}
        reference generations (same case format as tests/fixtures/cases.json) and their intermediates:
        prompt_embeds, text_embeds, time_ids of the first UNet call, init latents, noise, latents per step

Determinism: as make_fixtures.py (seeded generators, one thread, sorted JSON).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets one thread, silences diffusers)
import diffusers  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

FIX = mf.FIX
OUT = FIX / "sdxl"

# The scheduler config stabilityai/stable-diffusion-xl-base-1.0 ships (only the keys it contains).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TIME_EMBED = 8  # addition_time_embed_dim (256 in the real model)
# Head counts are the real models' (12 and 20, and 64-wide UNet heads): single files do not record them, so a
# loader infers them as diffusers' configs have them, and the tiny models must follow the same rule.
TEXT_L = dict(  # CLIP ViT-L's shape, shrunk
    vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
TEXT_G = dict(  # OpenCLIP ViT-bigG's shape, shrunk; the real config says bos 0 / eos 2
    vocab_size=49408, hidden_size=80, intermediate_size=160, num_hidden_layers=3, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
    projection_dim=40,
)


def unet_config(cross_attention_dim, time_ids):
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 2),  # channels / 64, as in SDXL
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TIME_EMBED * time_ids + TEXT_G["projection_dim"],
        norm_num_groups=32,
    )


VAE = dict(mf.SD1_VAE, scaling_factor=0.13025, force_upcast=True)


def drawn(model, gen):
    mf.liven(model, gen)
    return model


def build():
    gen = torch.Generator("cpu").manual_seed(2001)
    torch.manual_seed(2001)
    text_l = drawn(CLIPTextModel(CLIPTextConfig(**TEXT_L)), gen)
    text_g = drawn(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_G)), gen)
    vae = drawn(AutoencoderKL(**VAE), gen)
    mf.scale_vae_latents(vae)
    base_unet = drawn(UNet2DConditionModel(**unet_config(TEXT_L["hidden_size"] + TEXT_G["hidden_size"], 6)), gen)
    refiner_unet = drawn(UNet2DConditionModel(**unet_config(TEXT_G["hidden_size"], 5)), gen)
    # Stored in fp16 (as SDXL repositories ship); the references run in float32 on exactly these values.
    return [m.to(torch.float16).eval() for m in (text_l, text_g, vae, base_unet, refiner_unet)]


def save_text(model, d):
    model.save_pretrained(d)  # config.json
    # transformers 5 drops the `text_model.` prefix when saving; real repositories have it.
    sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v.contiguous()
          for k, v in model.state_dict().items()}
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


# The scheduler config stabilityai/sdxl-turbo ships.
TURBO_SCHEDULER = dict(SDXL_SCHEDULER, _class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
del TURBO_SCHEDULER["interpolation_type"], TURBO_SCHEDULER["use_karras_sigmas"]


def save_folder(model_id, unet, vae, text_l, text_g, refiner, scheduler=SDXL_SCHEDULER):
    d = mf.CKPT / model_id
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    unet.save_pretrained(d / "unet", safe_serialization=True)
    vae.save_pretrained(d / "vae", safe_serialization=True)
    if text_l is not None:
        save_text(text_l, d / "text_encoder")
        mf.write_tokenizer_dir(d / "tokenizer", "<|endoftext|>")
    save_text(text_g, d / "text_encoder_2")
    mf.write_tokenizer_dir(d / "tokenizer_2", "!")
    mf.write_json(d / "scheduler" / "scheduler_config.json", dict(scheduler, _diffusers_version=diffusers.__version__))
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": not refiner,
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    mf.write_json(d / "model_index.json", index)
    return d


def load_pipeline(model_id):
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(mf.CKPT / model_id, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def case(name, model, scheduler, seed, **kw):
    c = mf.img2img_case(name, model, scheduler, seed, num_inference_steps=8, strength=0.75, guidance_scale=6.0)
    c.update(kw)
    return c


def all_cases():
    base = "sdxl-tiny"
    cases = [
        case("sdxl-euler-s42", base, "EulerDiscreteScheduler", 42),
        case("sdxl-eulera-s42", base, "EulerAncestralDiscreteScheduler", 42),
        case("sdxl-ddim-s42", base, "DDIMScheduler", 42),
        case("sdxl-dpm2m-karras-s42", base, "DPMSolverMultistepScheduler", 42, use_karras_sigmas=True),
        case("sdxl-heun-karras-s42", base, "HeunDiscreteScheduler", 42, use_karras_sigmas=True),
        case("sdxl-unipc-s42", base, "UniPCMultistepScheduler", 42),
        case("sdxl-lms-s42", base, "LMSDiscreteScheduler", 42),
        case("sdxl-euler-noneg-s0-n2", base, "EulerDiscreteScheduler", 0, negative_prompt=None, samples=2),
        case("sdxl-euler-clipskip2-s0", base, "EulerDiscreteScheduler", 0, clip_skip=2),
        case("sdxl-euler-cfg1-s0", base, "EulerDiscreteScheduler", 0, guidance_scale=1.0),
        case("sdxl-dpm2m-72x56-s7-n2", base, "DPMSolverMultistepScheduler", 7, init_image="init-72x56.png",
             width=72, height=56, samples=2, strength=0.6),
        case("sdxl-refiner-euler-s3", "sdxl-refiner-tiny", "EulerDiscreteScheduler", 3, strength=0.3,
             num_inference_steps=10),
        case("sdxl-refiner-noneg-s3", "sdxl-refiner-tiny", "EulerAncestralDiscreteScheduler", 3,
             negative_prompt=None, strength=0.3, num_inference_steps=10),
        # SDXL-Turbo's recipe (diffusers' docs): 2 steps at strength 0.5, no guidance, trailing spacing.
        case("sdxl-turbo-eulera-s5", "sdxl-turbo-tiny", "EulerAncestralDiscreteScheduler", 5,
             num_inference_steps=2, strength=0.5, guidance_scale=0.0, negative_prompt=None),
        # LCM sampling on the same trailing config: 4 steps, guidance 1.
        case("sdxl-turbo-lcm-s5", "sdxl-turbo-tiny", "LCMScheduler", 5, num_inference_steps=4,
             strength=0.6, guidance_scale=1.0, negative_prompt=None),
    ]
    return cases


NOTES = {
    "noneg": "negative_prompt null on the base (force_zeros_for_empty_prompt): the unconditional prompt "
             "embedding and pooled embedding are zeros, not the encoding of \"\".",
    "refiner-noneg": "The refiner ships force_zeros_for_empty_prompt false: a null negative prompt is encoded as "
                     "\"\" (text_encoder_2 alone).",
    "clipskip": "Pictor clip_skip 2 = diffusers clip_skip 1: both encoders use hidden_states[-(1 + 2)] (SDXL "
                "always starts from the penultimate layer, without the final layer norm); the negative prompt "
                "uses hidden_states[-2].",
    "refiner": "Refiner: time ids are (original h, w, crop top, left, aesthetic score 6.0), the negative's end in "
               "2.5.",
}


def notes_for(name):
    out = []
    for key, note in NOTES.items():
        if key in name and not (key == "noneg" and "refiner" in name):
            out.append(note)
    return out


class Recorder:
    def __init__(self, pipe, samples):
        self.t, self.timesteps, self.pipe, self.samples, self._undo = {}, [], pipe, samples, []

    def _wrap(self, obj, attr, make):
        orig = getattr(obj, attr)
        setattr(obj, attr, make(orig))
        self._undo.append((obj, attr))

    def __enter__(self):
        t = self.t

        def add_noise(orig):
            def f(original, noise, timesteps):
                t["init_latents"] = original.detach().clone()
                t["noise"] = noise.detach().clone()
                return orig(original, noise, timesteps)
            return f

        def unet_forward(orig):
            def f(sample, timestep, encoder_hidden_states=None, *a, added_cond_kwargs=None, **kw):
                if "prompt_embeds" not in t:
                    t["unet_input"] = sample.detach().clone()
                    t["prompt_embeds"] = encoder_hidden_states.detach().clone()
                    t["text_embeds"] = added_cond_kwargs["text_embeds"].detach().clone()
                    t["time_ids"] = added_cond_kwargs["time_ids"].detach().clone()
                    out = orig(sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=added_cond_kwargs, **kw)
                    t["unet_output"] = out[0].detach().clone()
                    t["unet_timestep"] = torch.tensor([float(timestep)])
                    return out
                return orig(sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=added_cond_kwargs, **kw)
            return f

        self._wrap(self.pipe.scheduler, "add_noise", add_noise)
        self._wrap(self.pipe.unet, "forward", unet_forward)
        return self

    def __exit__(self, *exc):
        for obj, attr in reversed(self._undo):
            delattr(obj, attr)

    def callback(self, pipe, i, timestep, kw):
        self.timesteps.append(float(timestep))
        self.t[f"latents_step_{i}"] = kw["latents"].detach().clone()
        return {}


def run_case(pipe, c, base_config):
    kw = dict(mf.call_kwargs(pipe, c, base_config), strength=c["strength"])
    if c["clip_skip"] > 1:
        kw["clip_skip"] = c["clip_skip"] - 1
    rec = Recorder(pipe, c["samples"])
    with rec:
        out = pipe(**kw, callback_on_step_end=rec.callback, callback_on_step_end_tensor_inputs=["latents"]).images
    tensors = rec.t
    tensors["timesteps"] = torch.tensor(rec.timesteps, dtype=torch.float32)
    tensors["image"] = torch.from_numpy(np.ascontiguousarray(out))
    return out, tensors, rec.timesteps


def unet_key_to_ldm(key, cfg):
    if key.startswith("add_embedding."):
        p = key.split(".")
        return {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}[p[1]] + "." + ".".join(p[2:])
    return mf.unet_key_to_ldm(key, cfg)


def text_to_openclip(text_sd, prefix):
    """CLIPTextModelWithProjection state dict -> OpenCLIP text tower names under `prefix` (every layer, as
    SDXL files hold them), text_projection stored as OpenCLIP does (x @ P, i.e. the transposed weight)."""
    pre = "text_model."
    out = {
        prefix + "token_embedding.weight": text_sd[pre + "embeddings.token_embedding.weight"],
        prefix + "positional_embedding": text_sd[pre + "embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": text_sd[pre + "final_layer_norm.weight"],
        prefix + "ln_final.bias": text_sd[pre + "final_layer_norm.bias"],
        prefix + "text_projection": text_sd["text_projection.weight"].t().contiguous(),
        prefix + "logit_scale": torch.tensor(4.6052, dtype=text_sd["text_projection.weight"].dtype),
    }
    layers = {int(k.split(".")[3]) for k in text_sd if k.startswith(pre + "encoder.layers.")}
    for n in sorted(layers):
        src = f"{pre}encoder.layers.{n}."
        dst = f"{prefix}transformer.resblocks.{n}."
        for hf, oc in mf.OPENCLIP_LAYER.items():
            for wb in ("weight", "bias"):
                out[f"{dst}{oc}.{wb}"] = text_sd[f"{src}{hf}.{wb}"]
        for wb in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{wb}"] = torch.cat(
                [text_sd[f"{src}self_attn.{x}_proj.{wb}"] for x in ("q", "k", "v")], dim=0)
    return out


def write_single_file(model_id):
    folder = mf.CKPT / model_id
    from safetensors.torch import load_file
    unet_sd = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae_sd = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    out = {}
    for k, t in unet_sd.items():
        out["model.diffusion_model." + unet_key_to_ldm(k, unet_cfg)] = t
    for k, t in vae_sd.items():
        name, reshape = mf.vae_key_to_ldm(k, vae_cfg)
        out["first_stage_model." + name] = t[:, :, None, None] if reshape else t
    embedder = 0
    if (folder / "text_encoder").is_dir():
        for k, t in load_file(folder / "text_encoder" / "model.safetensors").items():
            out["conditioner.embedders.0.transformer." + k] = t
        embedder = 1
    text_g = load_file(folder / "text_encoder_2" / "model.safetensors")
    out.update(text_to_openclip(text_g, f"conditioner.embedders.{embedder}.model."))
    path = mf.CKPT / f"{model_id}-single.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"format": "pt"})
    # diffusers' own reader must give back exactly the folder's weights.
    pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(str(path), config=str(folder), torch_dtype=torch.float16)
    mine = load_pipeline(model_id)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name), getattr(mine, name)
        if a is None and b is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        sa = {k: v for k, v in sa.items() if not k.endswith("position_ids")}
        sb = {k: v for k, v in sb.items() if not k.endswith("position_ids")}
        assert sorted(sa) == sorted(sb), f"{model_id} {name}: keys differ {sorted(set(sa) ^ set(sb))[:5]}"
        for k in sa:
            assert torch.equal(sa[k].float(), sb[k].float()), f"{model_id} {name}: {k} differs"
    print(f"  {path.name}: diffusers' from_single_file gives the folder's weights", flush=True)
    return path


LORA_RANK = 4
KOHYA_ALPHA = 2.0


def lora_files(model_id):
    """One random LoRA (rank 4, up random too, as a trained LoRA's is) on the attention and MLP layers of
    `model_id`'s UNet and both text encoders, written in diffusers/PEFT naming (alpha = rank) and in
    sd-scripts' SDXL naming (alpha 2). Returns the two paths."""
    pipe = load_pipeline(model_id)
    gen = torch.Generator("cpu").manual_seed(3001)
    unet_cfg_json = json.loads((mf.CKPT / model_id / "unet" / "config.json").read_text())

    def unet_keep(n):
        return n.split(".")[-1] in ("to_q", "to_k", "to_v", "proj_in", "proj_out") or n.endswith(("to_out.0", "ff.net.2"))

    def text_keep(n):
        return n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")

    peft_sd, kohya_sd = {}, {}
    for prefix, module, keep in (("unet", pipe.unet, unet_keep), ("text_encoder", pipe.text_encoder, text_keep),
                                 ("text_encoder_2", pipe.text_encoder_2, text_keep)):
        for name, m in module.named_modules():
            if not isinstance(m, torch.nn.Linear) or not keep(name):
                continue
            if prefix != "unet" and not name.startswith("text_model."):
                name = "text_model." + name  # as transformers 4 (and every real LoRA) names it
            down = (torch.randn((LORA_RANK, m.in_features), generator=gen) / m.in_features ** 0.5).to(torch.float16)
            up = (torch.randn((m.out_features, LORA_RANK), generator=gen) * 0.15).to(torch.float16)
            peft_sd[f"{prefix}.{name}.lora_A.weight"] = down
            peft_sd[f"{prefix}.{name}.lora_B.weight"] = up
            if prefix == "unet":
                kohya = "lora_unet_" + unet_key_to_ldm(name + ".weight", unet_cfg_json)[: -len(".weight")].replace(".", "_")
            else:
                kohya = ("lora_te1_" if prefix == "text_encoder" else "lora_te2_") + name.replace(".", "_")
            kohya_sd[f"{kohya}.lora_down.weight"] = down
            kohya_sd[f"{kohya}.lora_up.weight"] = up
            kohya_sd[f"{kohya}.alpha"] = torch.tensor(KOHYA_ALPHA, dtype=torch.float16)
    loras = mf.FIX / "models" / "loras"
    paths = (loras / "tiny-sdxl-peft.safetensors", loras / "tiny-sdxl-kohya.safetensors")
    save_file(peft_sd, paths[0], metadata={"format": "pt"})
    save_file(kohya_sd, paths[1], metadata={"ss_network_module": "networks.lora"})  # one key: a stable header
    return paths


def lora_cases():
    """diffusers' images with the SDXL LoRAs, and the check that its kohya reader agrees with our naming."""
    peft_path, kohya_path = lora_files("sdxl-tiny")
    base = dict(mf.img2img_case("x", "sdxl-tiny", "EulerDiscreteScheduler", 11, num_inference_steps=8,
                                strength=0.75, guidance_scale=6.0, negative_prompt="blurry"),
                prompt="a photo of a cat")
    runs = [("sdxl-peft-1.0", [("tiny-sdxl-peft", 1.0)], peft_path, 1.0),
            ("sdxl-kohya-0.8", [("tiny-sdxl-kohya", 0.8)], kohya_path, 0.8),
            ("sdxl-peft-0.4", [("tiny-sdxl-peft", 0.4)], peft_path, 0.4)]
    out_dir = OUT / "lora"
    records, images = [], {}
    plain = None
    for name, loras, path, strength in runs:
        pipe = load_pipeline("sdxl-tiny")
        if plain is None:
            plain, _, _ = run_case(pipe, dict(base, name="plain"), dict(pipe.scheduler.config))
        pipe.load_lora_weights(str(path), adapter_name="a")
        pipe.set_adapters(["a"], adapter_weights=[strength])
        c = dict(base, name=name, loras=loras)
        out, _, _ = run_case(pipe, c, dict(pipe.scheduler.config))
        d = out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        mf.to_png(out[0]).save(d / "0.png")
        images[name] = out[0]
        rec = {k: c[k] for k in ("name", "model", "prompt", "negative_prompt", "init_image", "width", "height",
                                 "samples", "num_inference_steps", "guidance_scale", "strength", "seed",
                                 "scheduler", "loras")}
        records.append(dict(rec, images=[f"lora/{name}/0.png"]))
        print(f"  {name:<28} mean |Δ| to no LoRA {np.abs(out[0] - plain[0]).mean():.3f}", flush=True)
        assert np.abs(out[0] - plain[0]).mean() > 0.01, f"{name}: the LoRA barely changes the image"
    # kohya at 0.8 with alpha 2 of rank 4 is the PEFT file (alpha = rank) at 0.4: diffusers' kohya converter
    # read our SDXL names as the same layers.
    d = np.abs(images["sdxl-kohya-0.8"] - images["sdxl-peft-0.4"])
    assert d.max() < 2 / 255, f"kohya naming disagrees with diffusers' converter: max {d.max() * 255:.2f}/255"
    mf.write_json(OUT / "lora_cases.json", records)


EMBEDDING = "sdxlstyle"


def embedding_cases():
    """An SDXL embedding (2 vectors per encoder) and diffusers' images with it on the base and the refiner."""
    gen = torch.Generator("cpu").manual_seed(4001)
    vectors = {"clip_l": torch.randn((2, TEXT_L["hidden_size"]), generator=gen),
               "clip_g": torch.randn((2, TEXT_G["hidden_size"]), generator=gen)}
    path = OUT / "embeddings" / f"{EMBEDDING}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in vectors.items()}, path)
    stored = {k: v.to(torch.float16).float() for k, v in vectors.items()}
    records = []
    for name, model_id, seed in (("sdxl-emb-s13", "sdxl-tiny", 13), ("sdxl-refiner-emb-s13", "sdxl-refiner-tiny", 13)):
        pipe = load_pipeline(model_id)
        if pipe.text_encoder is not None:
            pipe.load_textual_inversion(stored["clip_l"], token=EMBEDDING, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(stored["clip_g"], token=EMBEDDING, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        c = case(name, model_id, "EulerDiscreteScheduler", seed, prompt=f"a photo of {EMBEDDING} cat",
                 strength=0.3 if "refiner" in name else 0.75)
        out, _, timesteps = run_case(pipe, c, dict(pipe.scheduler.config))
        plain, _, _ = run_case(load_pipeline(model_id), dict(c, prompt="a photo of cat"),
                               dict(pipe.scheduler.config))
        assert np.abs(out[0] - plain[0]).mean() > 0.005, f"{name}: the embedding barely changes the image"
        d = OUT / "embedding" / name
        d.mkdir(parents=True, exist_ok=True)
        mf.to_png(out[0]).save(d / "0.png")
        records.append(dict(c, embeddings=[EMBEDDING], images=[f"sdxl/embedding/{name}/0.png"],
                            timesteps=[int(x) for x in timesteps], notes=[]))
        print(f"  {name:<28} mean |Δ| to the plain prompt {np.abs(out[0] - plain[0]).mean():.3f}", flush=True)
    mf.write_json(OUT / "embedding_cases.json", records)


def main():
    text_l, text_g, vae, base_unet, refiner_unet = build()
    save_folder("sdxl-tiny", base_unet, vae, text_l, text_g, refiner=False)
    save_folder("sdxl-refiner-tiny", refiner_unet, vae, None, text_g, refiner=True)
    save_folder("sdxl-turbo-tiny", base_unet, vae, text_l, text_g, refiner=False, scheduler=TURBO_SCHEDULER)
    pipes = {}
    for model_id in ("sdxl-tiny", "sdxl-refiner-tiny", "sdxl-turbo-tiny"):
        pipe = load_pipeline(model_id)
        pipes[model_id] = (pipe, dict(pipe.scheduler.config))
    if OUT.exists():
        shutil.rmtree(OUT)
    records = []
    images = {}
    for c in all_cases():
        pipe, base_config = pipes[c["model"]]
        out, tensors, timesteps = run_case(pipe, c, base_config)
        d = OUT / "cases" / c["name"]
        d.mkdir(parents=True)
        paths = []
        for i, arr in enumerate(out):
            mf.to_png(arr).save(d / f"{i}.png")
            paths.append(f"sdxl/cases/{c['name']}/{i}.png")
        save_file({k: v.float().contiguous() for k, v in sorted(tensors.items())}, d / "tensors.safetensors",
                  metadata={"format": "pt"})
        records.append(dict(c, images=paths, tensors=f"sdxl/cases/{c['name']}/tensors.safetensors",
                            notes=notes_for(c["name"]),
                            timesteps=[int(x) if float(x).is_integer() else x for x in timesteps]))
        images[c["name"]] = out
        print(f"  {c['name']:<28} mean {out.mean():.3f} std {out.std():.3f} "
              f"saturated {np.mean((out <= 0) | (out >= 1)):.3f} steps {len(timesteps)}", flush=True)
    # The networks must matter: schedulers, negative prompt, clip skip and guidance change the image.
    first = images["sdxl-euler-s42"][0]
    for name in ("sdxl-eulera-s42", "sdxl-dpm2m-karras-s42", "sdxl-unipc-s42"):
        d = np.abs(images[name][0] - first).mean()
        assert d > 0.005, f"{name} is nearly identical to sdxl-euler-s42 ({d})"
    zero = images["sdxl-euler-noneg-s0-n2"][0]
    for name in ("sdxl-euler-clipskip2-s0", "sdxl-euler-cfg1-s0"):
        d = np.abs(images[name][0] - zero).mean()
        assert d > 0.005, f"{name} is nearly identical to sdxl-euler-noneg-s0-n2 ({d})"
    for model_id, ref in (("sdxl-tiny", "sdxl-euler-s42"), ("sdxl-refiner-tiny", "sdxl-refiner-euler-s3")):
        path = write_single_file(model_id)
        base = next(r for r in records if r["name"] == ref)
        records.append(dict(base, name=ref.replace("sdxl-", "sdxl-single-", 1), model=path.name, same_as=ref,
                            notes=["Single-file checkpoint: the loader must give exactly the folder model; expected "
                                   "output is that of the same_as case."]))
    mf.write_json(OUT / "cases.json", records)
    lora_cases()
    embedding_cases()
    print(f"done: {len(records)} cases in {OUT}", flush=True)


if __name__ == "__main__":
    main()
