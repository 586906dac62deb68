"""Drives the official `openai` Python SDK against a Pictor server's OpenAI Images API.

    python openai_client.py BASE_URL KEY INIT_IMAGE_PNG OUT_DIR

`images.generate` and `images.edit` (img2img, and InstructPix2Pix with such a model) in both response formats,
`models.list`, and the errors the SDK raises for a mask, a bad size and a wrong key. Stable Diffusion's own
settings travel as `extra_body`, as the SDK documents for fields it does not know. Writes the images to
OUT_DIR/<name>-<i>.png and what the SDK returned to OUT_DIR/out.json; exits 0 whenever it could write out.json.
"""

import base64
import json
import sys
import traceback
import urllib.request
from pathlib import Path

import openai
from openai import OpenAI

base, key, init_path, out_dir = sys.argv[1:5]
out = Path(out_dir)
PROMPT = r"a photo of a cat, \(\(cinematic lighting\)\)"
client = OpenAI(base_url=f"{base}/v1", api_key=key)
results = {}


def save(name, response):
    paths = []
    for i, image in enumerate(response.data):
        data = base64.b64decode(image.b64_json) if image.b64_json else urllib.request.urlopen(image.url).read()
        path = out / f"{name}-{i}.png"
        path.write_bytes(data)
        paths.append(str(path))
    results[name] = {"images": paths, "created": response.created, "size": response.size,
                     "urls": [d.url for d in response.data], "revised_prompt": response.data[0].revised_prompt}


def step(name, fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 -- reported to the Rust test
        results[name + "_error"] = traceback.format_exc()


def models():
    results["models"] = [m.id for m in client.models.list()]


def generate():
    # Case t2i-sd1-pndm-s42: the model's own scheduler (PNDM).
    extra = {"negative_prompt": "blurry", "seed": 42, "num_inference_steps": 8, "guidance_scale": 7.5}
    save("generate_b64", client.images.generate(model="sd1-tiny", prompt=PROMPT, n=1, size="64x64",
                                                response_format="b64_json", extra_body=extra))
    save("generate_url", client.images.generate(model="sd1-tiny", prompt=PROMPT, size="64x64",
                                                response_format="url", extra_body=extra))


def edit():
    # Case sd1-pndm-s42 (img2img) and p2p-eulera-s3 (InstructPix2Pix).
    with open(init_path, "rb") as f:
        save("edit_b64", client.images.edit(model="sd1-tiny", image=f, prompt=PROMPT, size="64x64",
                                            response_format="b64_json",
                                            extra_body={"negative_prompt": "blurry", "seed": 42,
                                                        "num_inference_steps": 10, "strength": 0.75}))
    with open(init_path, "rb") as f:
        save("edit_pix2pix", client.images.edit(model="pix2pix-tiny", image=f, prompt="turn it into a painting",
                                                response_format="url",
                                                extra_body={"seed": 3, "num_inference_steps": 10}))


def errors():
    def caught(fn):
        try:
            fn()
            return "accepted"
        except openai.APIStatusError as e:
            return {"status": e.status_code, "body": e.body, "class": type(e).__name__}

    with open(init_path, "rb") as f, open(init_path, "rb") as m:
        results["mask"] = caught(lambda: client.images.edit(model="sd1-tiny", image=f, mask=m, prompt="a"))
    results["bad_size"] = caught(lambda: client.images.generate(model="sd1-tiny", prompt="a", size="huge"))
    wrong = OpenAI(base_url=f"{base}/v1", api_key="not-a-key", max_retries=0)
    results["wrong_key"] = caught(lambda: wrong.images.generate(prompt="a"))


for name, fn in [("models", models), ("generate", generate), ("edit", edit), ("errors", errors)]:
    step(name, fn)
(out / "out.json").write_text(json.dumps(results, indent=2, default=str))
