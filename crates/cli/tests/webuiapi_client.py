"""Drives `webuiapi` (the AUTOMATIC1111 API client from PyPI) against a Pictor server.

    python webuiapi_client.py BASE_URL KEY INIT_IMAGE_PNG OUT_DIR

Authenticates as A1111's `--api-auth` clients do (HTTP Basic, the API key as the password), lists and switches
models through `/sdapi/v1/options`, runs txt2img and img2img with fixed seeds, a batch, progress and interrupt,
and one bad request. Writes every image it got to OUT_DIR/<name>-<i>.png and what the client returned to
OUT_DIR/out.json; the Rust test (`clients.rs`) compares them with the fixtures. Exits 0 whenever it could
write out.json, so that the test reports the details of any failure.
"""

import json
import sys
import traceback
from pathlib import Path

import webuiapi
from PIL import Image

base, key, init_path, out_dir = sys.argv[1:5]
out = Path(out_dir)
# diffusers took the fixture prompt literally; in Pictor's (A1111) prompt syntax literal brackets are escaped.
PROMPT = r"a photo of a cat, \(\(cinematic lighting\)\)"
results = {}


def save(name, result):
    paths = []
    for i, image in enumerate(result.images):
        path = out / f"{name}-{i}.png"
        image.save(path)
        paths.append(str(path))
    results[name] = {"images": paths, "info": result.info, "parameters": result.parameters}


def step(name, fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 -- reported to the Rust test
        results[name + "_error"] = traceback.format_exc()


api = webuiapi.WebUIApi(baseurl=f"{base}/sdapi/v1", username="pictor", password=key)


def models():
    results["models"] = api.util_get_model_names()
    results["samplers"] = api.util_get_sampler_names()
    results["schedulers"] = api.util_get_scheduler_names()
    results["loras"] = [l["name"] for l in api.get_loras()]
    api.util_set_model("sd1-tiny")
    results["current_model"] = api.util_get_current_model()


def txt2img():
    # Case t2i-sd1-euler-s7: EulerDiscreteScheduler, uniform sigmas.
    save("txt2img", api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=7, steps=8, cfg_scale=7.5,
                                width=64, height=64, sampler_name="Euler", scheduler="Uniform"))


def batch():
    save("batch", api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=7, steps=8, cfg_scale=7.5,
                              width=64, height=64, sampler_name="Euler", scheduler="Uniform", batch_size=2))


def img2img():
    # Case sd1-ddim-s42.
    init = Image.open(init_path)
    save("img2img", api.img2img(images=[init], prompt=PROMPT, negative_prompt="blurry", seed=42, steps=10,
                                cfg_scale=7.5, denoising_strength=0.75, width=64, height=64, sampler_name="DDIM"))


def switch_model():
    # Case t2i-sd2-ddim-s5 on the model chosen through options.
    api.util_set_model("sd2-tiny")
    results["switched_model"] = api.util_get_current_model()
    save("sd2", api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=5, steps=8, cfg_scale=6.0,
                            width=64, height=64, sampler_name="DDIM"))
    api.util_set_model("sd1-tiny")


def idle_progress_and_interrupt():
    results["progress"] = api.get_progress()
    results["interrupt"] = api.interrupt()


def bad_sampler():
    try:
        api.txt2img(prompt="a cat", sampler_name="DPM++ 2S a", steps=2, width=64, height=64)
        results["bad_sampler"] = "accepted"
    except RuntimeError as e:
        results["bad_sampler"] = {"status": e.args[0], "body": json.loads(e.args[1])}


for name, fn in [("models", models), ("txt2img", txt2img), ("batch", batch), ("img2img", img2img),
                 ("switch_model", switch_model), ("progress", idle_progress_and_interrupt),
                 ("bad_sampler", bad_sampler)]:
    step(name, fn)
(out / "out.json").write_text(json.dumps(results, indent=2, default=str))
