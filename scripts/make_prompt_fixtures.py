#!/usr/bin/env python3
"""Writes tests/fixtures/prompts/: reference conditioning for Pictor's prompt syntax and textual inversion.

Run by hand from the repository root, after scripts/make_fixtures.py (it uses the tiny models):

    /work/venv/bin/python scripts/make_prompt_fixtures.py      # a few seconds

What it writes (read by crates/engine/tests/prompts.rs):
  - prompts.json                  the cases: model, prompt, clip_skip, embeddings used, tensor key
  - conditioning.safetensors      for each case the conditioning (1, 77*k, hidden), computed below by a
                                  straightforward Python implementation of AUTOMATIC1111's rules (attention
                                  brackets, BREAK, 75-token chunks, comma backtrack of 20, embeddings never
                                  split, z*w then rescale to the unweighted mean) on transformers' CLIPTextModel
  - embeddings/pictor-style.pt            AUTOMATIC1111 format: {'string_to_param': {'*': (3, 48)}, ...}
  - embeddings-st/pictor-style.safetensors  the same vectors as AUTOMATIC1111's {'emb_params': ...}
  - embeddings/pictor-dot.bin             diffusers format: {'<pictor-dot>': (48,)} -> trigger "pictor-dot"
  - embeddings/sd2-style.pt               an embedding for sd2-tiny's width (for the wrong-model error)
  - ti-img2img.png, ti-img2img.safetensors
                                  diffusers' StableDiffusionImg2ImgPipeline on sd1-tiny after
                                  pipe.load_textual_inversion(embeddings/pictor-style.pt, token="pictor-style"):
                                  image and prompt_embeds ([negative, positive])

Determinism: seeded generators, one thread, sorted JSON.
"""

import json
import re
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file, load_file  # noqa: E402
from diffusers import StableDiffusionImg2ImgPipeline  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
CKPT = FIX / "models" / "checkpoints"
OUT = FIX / "prompts"

CHUNK = 75
COMMA_BACKTRACK = 20


# ----------------------------------------------------------------------------------------------
# The rules, written plainly (see crates/engine/src/prompt_syntax.rs for the user documentation)
# ----------------------------------------------------------------------------------------------

def parse(text):
    """[(text, weight)] with "BREAK" entries as (None, None). Raises on unbalanced brackets."""
    res = []  # [text or None, weight]
    stack = []  # (kind, first index)
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 < len(text) and text[i + 1] in "()[]\\":
                res.append([text[i + 1], 1.0])
                i += 2
            else:
                res.append(["\\", 1.0])
                i += 1
        elif c in "([":
            stack.append((c, len(res)))
            i += 1
        elif c in ")]":
            kind, start = stack.pop()
            assert kind == {")": "(", "]": "["}[c], "unbalanced"
            for r in res[start:]:
                r[1] *= 1.1 if c == ")" else 1 / 1.1
            i += 1
        elif c == ":":
            m = re.compile(r":\s*([+-]?[.\d]+)\s*\)").match(text, i)
            if m and stack and stack[-1][0] == "(":
                _, start = stack.pop()
                for r in res[start:]:
                    r[1] *= float(m.group(1))
                i = m.end()
            else:
                res.append([":", 1.0])
                i += 1
        else:
            m = re.compile(r"[^\\()\[\]:]+").match(text, i)
            parts = re.split(r"\s*\bBREAK\b\s*", m.group(0))
            for k, part in enumerate(parts):
                if k:
                    res.append([None, None])
                res.append([part, 1.0])
            i = m.end()
    assert not stack, "unbalanced"
    merged = []
    for t, w in res:
        if t is not None and merged and merged[-1][0] is not None and merged[-1][1] == w:
            merged[-1][0] += t
        else:
            merged.append([t, w])
    return merged


def chunks_of(tokenizer, prompt, triggers):
    """Chunks as lists of (token id or ("vec", embedding index, row), weight), each 75 long at most."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks, cur, last_comma = [], [], -1

    def close():
        nonlocal cur, last_comma
        chunks.append(cur)
        cur, last_comma = [], -1

    for text, weight in parse(prompt):
        if text is None:
            close()
            continue
        ids = tokenizer(text, add_special_tokens=False).input_ids
        pos = 0
        while pos < len(ids):
            if ids[pos] == comma:
                last_comma = len(cur)
            elif len(cur) == CHUNK and last_comma != -1 and len(cur) - last_comma <= COMMA_BACKTRACK:
                moved = cur[last_comma + 1:]
                cur = cur[:last_comma + 1]
                close()
                cur = moved
            if len(cur) == CHUNK:
                close()
            match = None
            for e, (name_ids, n) in enumerate(triggers):
                if ids[pos:pos + len(name_ids)] == name_ids and (match is None or len(name_ids) > len(triggers[match][0])):
                    match = e
            if match is None:
                cur.append((ids[pos], weight))
                pos += 1
            else:
                name_ids, n = triggers[match]
                if len(cur) + n > CHUNK:
                    close()
                cur += [(("vec", match, r), weight) for r in range(n)]
                pos += len(name_ids)
    if cur or not chunks:
        close()
    return chunks


def encode(tokenizer, text_encoder, prompt, clip_skip, embeddings):
    """The conditioning (1, 77*k, hidden) of `prompt`; `embeddings` = [(name, vectors (n, hidden))]."""
    triggers = [(tokenizer(name, add_special_tokens=False).input_ids, v.shape[0]) for name, v in embeddings]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    out = []
    for chunk in chunks_of(tokenizer, prompt, triggers):
        slots = [bos] + [s for s, _ in chunk] + [eos]
        weights = [1.0] + [w for _, w in chunk] + [1.0]
        slots += [pad] * (77 - len(slots))
        weights += [1.0] * (77 - len(weights))
        ids = torch.tensor([[s if isinstance(s, int) else pad for s in slots]])
        replace = {i: embeddings[s[1]][1][s[2]] for i, s in enumerate(slots) if not isinstance(s, int)}

        def hook(_module, _inputs, output):
            output = output.clone()
            for i, v in replace.items():
                output[0, i] = v
            return output

        handle = text_encoder.embeddings.token_embedding.register_forward_hook(hook)
        try:
            with torch.no_grad():
                res = text_encoder(ids, output_hidden_states=True)
                z = res.last_hidden_state if clip_skip == 1 else \
                    text_encoder.final_layer_norm(res.hidden_states[-clip_skip])
        finally:
            handle.remove()
        w = torch.tensor(weights, dtype=torch.float32)
        if (w != 1).any():
            original_mean = z.mean()
            z = z * w.reshape(1, -1, 1)
            z = z * (original_mean / z.mean())
        out.append(z)
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

LONG = ("a cozy cabin in snowy mountains, warm light in the windows, pine trees, (starry night sky:1.2), "
        "aurora borealis, frozen lake in the foreground, reflections, [fog], smoke from the chimney, "
        "a deer near the shore, highly detailed, sharp focus, ((masterpiece)), volumetric light, "
        "soft shadows, cinematic composition, wide angle lens, 35mm film, grain, muted colors, "
        "by a famous landscape painter, trending on an art site, award winning photograph")

CASES = [
    # name, model, prompt, clip_skip, embeddings
    ("weights", "sd1-tiny", "a (red:1.5) cat, [blurry] ((sharp)) \\(literal\\) (x:0.5) [[y]]", 1, []),
    ("plain", "sd1-tiny", "a photo of a cat", 1, []),
    ("long", "sd1-tiny", LONG, 1, []),
    ("long-clipskip2", "sd1-tiny", LONG, 2, []),
    ("break", "sd1-tiny", "a red cat, (sitting:1.3) BREAK [a blue] dog BREAK BREAK (grass)", 1, []),
    ("sd2-long", "sd2-tiny", LONG + ", (one more:0.8)!", 1, []),
    ("sd2-break", "sd2-tiny", "a dog! BREAK (a cat:1.4)", 2, []),
    ("embedding", "sd1-tiny", "a photo of (pictor-style) cat, pictor-dot", 1, ["pictor-style", "pictor-dot"]),
    ("embedding-edge", "sd1-tiny", "cat " * 73 + "[pictor-style] cat", 1, ["pictor-style"]),
]


def write_embeddings():
    gen = torch.Generator("cpu").manual_seed(1234)
    style = torch.randn(3, 48, generator=gen) * 0.8
    dot = torch.randn(48, generator=gen)
    sd2 = torch.randn(2, 64, generator=gen)
    (OUT / "embeddings").mkdir(parents=True, exist_ok=True)
    (OUT / "embeddings-st").mkdir(parents=True, exist_ok=True)
    # AUTOMATIC1111's textual_inversion.Embedding.save: a plain dict.
    a1111 = lambda name, v: {  # noqa: E731
        "string_to_token": {"*": 265},
        "string_to_param": {"*": v.clone().requires_grad_(True)},
        "name": name,
        "step": 1000,
        "sd_checkpoint": "0123abcd",
        "sd_checkpoint_name": "tiny",
    }
    torch.save(a1111("pictor-style", style), OUT / "embeddings" / "pictor-style.pt")
    save_file({"emb_params": style.contiguous()}, OUT / "embeddings-st" / "pictor-style.safetensors")
    torch.save({"<pictor-dot>": dot}, OUT / "embeddings" / "pictor-dot.bin")
    torch.save(a1111("sd2-style", sd2), OUT / "embeddings" / "sd2-style.pt")
    return {"pictor-style": style, "pictor-dot": dot.unsqueeze(0)}


def conditioning_cases(vectors):
    tensors, records = {}, []
    loaded = {}
    for name, model, prompt, clip_skip, embs in CASES:
        if model not in loaded:
            tok = CLIPTokenizer.from_pretrained(CKPT / model / "tokenizer")
            te = CLIPTextModel.from_pretrained(CKPT / model / "text_encoder", torch_dtype=torch.float32).eval()
            loaded[model] = (tok, te)
        tok, te = loaded[model]
        z = encode(tok, te, prompt, clip_skip, [(e, vectors[e]) for e in embs])
        tensors[name] = z.contiguous()
        records.append(dict(name=name, model=model, prompt=prompt, clip_skip=clip_skip, embeddings=embs,
                            chunks=z.shape[1] // 77))
        print(f"  {name:<16} {model} chunks {z.shape[1] // 77}", flush=True)
    # Sanity: a short unweighted prompt is exactly diffusers' encoding.
    tok, te = loaded["sd1-tiny"]
    with torch.no_grad():
        ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert torch.equal(te(ids.input_ids)[0], tensors["plain"])
    return tensors, records


def ti_img2img():
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        CKPT / "sd1-tiny", torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(OUT / "embeddings" / "pictor-style.pt", token="pictor-style")
    case = dict(model="sd1-tiny", prompt="a photo of pictor-style cat", negative_prompt="blurry",
                init_image="init-64.png", num_inference_steps=10, strength=0.75, guidance_scale=7.5, seed=42,
                embedding="embeddings/pictor-style.pt", image="prompts/ti-img2img.png",
                tensors="prompts/ti-img2img.safetensors")
    init = Image.open(FIX / case["init_image"]).convert("RGB")
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(case["prompt"], "cpu", 1, True, case["negative_prompt"])
    out = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], image=init,
               num_inference_steps=case["num_inference_steps"], strength=case["strength"],
               guidance_scale=case["guidance_scale"], generator=torch.Generator("cpu").manual_seed(case["seed"]),
               output_type="np").images
    Image.fromarray((out[0] * 255).round().astype("uint8")).save(OUT / "ti-img2img.png")
    save_file({"prompt_embeds": torch.cat([neg, pos]).contiguous()}, OUT / "ti-img2img.safetensors",
              metadata={"format": "pt"})
    # The safetensors variant loads to the same conditioning.
    pipe2 = StableDiffusionImg2ImgPipeline.from_pretrained(
        CKPT / "sd1-tiny", torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe2.load_textual_inversion(OUT / "embeddings-st" / "pictor-style.safetensors", token="pictor-style")
    with torch.no_grad():
        pos2, _ = pipe2.encode_prompt(case["prompt"], "cpu", 1, True, case["negative_prompt"])
    assert torch.equal(pos, pos2)
    # And diffusers' textual inversion gives what the reference above computes.
    style = load_file(OUT / "embeddings-st" / "pictor-style.safetensors")["emb_params"]
    ours = encode(pipe.tokenizer, pipe.text_encoder, case["prompt"], 1, [("pictor-style", style)])
    assert (ours - pos).abs().max() < 1e-6, (ours - pos).abs().max()
    print(f"  ti-img2img mean {out.mean():.3f} std {out.std():.3f}", flush=True)
    return case


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    vectors = write_embeddings()
    tensors, records = conditioning_cases(vectors)
    save_file(tensors, OUT / "conditioning.safetensors", metadata={"format": "pt"})
    fixture = dict(
        generated_with=f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
                       f"transformers {transformers.__version__}",
        cases=records,
        ti_img2img=ti_img2img(),
    )
    (OUT / "prompts.json").write_text(json.dumps(fixture, indent=2, sort_keys=True) + "\n")
    (OUT / "README.md").write_text(
        "# Prompt fixtures\n\nWritten by `scripts/make_prompt_fixtures.py` (run by hand after "
        "`scripts/make_fixtures.py`); do not edit by hand. Its docstring lists the files. Generated with "
        f"{fixture['generated_with']}, CPU, float32, one thread. Re-runs are byte-identical.\n")


if __name__ == "__main__":
    main()
