"""Drives ModelsLab's own Python SDK (`modelslab_py` 0.2.3) against a Pictor server.

    python sdk_client.py BASE_URL KEY INIT_IMAGE_BASE64_FILE OUT_JSON

Runs img2img through the SDK's four image APIs -- v6 images (`Community`), enterprise images
(`Community(enterprise=True)`), v6 realtime (`Realtime`) and enterprise realtime (`Realtime(enterprise=True)`)
-- then asks each API's own `fetch` for the job. Against a server started with `--sync-timeout 0` the submit
answers `processing` and `fetch` polls until `success`; against a waiting server the submit already answers
`success` and `fetch` returns the finished job at once.

Only the SDK's public classes are used. `Client.post` is wrapped (calling the original) so that every HTTP call
the SDK made -- URL, fields sent, status answered -- lands in OUT_JSON next to what the SDK returned; the Rust
test (`sdk.rs`) asserts on that file. The script itself exits 0 whenever it could write OUT_JSON, so that the
test reports the details of any failure.
"""

import json
import sys
import traceback

from modelslab_py.core.apis.community import Community
from modelslab_py.core.apis.realtime import Realtime
from modelslab_py.core.client import Client
from modelslab_py.schemas.community import Image2Image, Text2Image
from modelslab_py.schemas.realtime import RealtimeImage2ImageSchema, RealtimeText2ImageSchema

# Case `sd1-ddim-s42` of tests/fixtures/cases.json.
# diffusers took the prompt literally; in Pictor's (AUTOMATIC1111) prompt syntax literal brackets are escaped.
PROMPT = r"a photo of a cat, \(\(cinematic lighting\)\)"
NEGATIVE_PROMPT = "blurry"
SIZE = 64
STEPS = 10
STRENGTH = 0.75
GUIDANCE = 7.5
SCHEDULER = "DDIMScheduler"
SEED = 42
MODEL_ID = "sd1-tiny"


def community_schema(init_image):
    # `Image2Image` declares no `strength` field but allows extra ones (pydantic `extra = "allow"`), and the
    # hosted v6 / enterprise img2img APIs document `strength`: it is passed as an extra keyword.
    return Image2Image(
        prompt=PROMPT,
        model_id=MODEL_ID,
        init_image=init_image,
        negative_prompt=NEGATIVE_PROMPT,
        width=SIZE,
        height=SIZE,
        samples=1,
        num_inference_steps=STEPS,
        seed=SEED,
        guidance_scale=GUIDANCE,
        scheduler=SCHEDULER,
        clip_skip=1,
        strength=STRENGTH,
        # The hosted API (and Pictor) enhance v6 / enterprise prompts by default; the reference image was made
        # from the prompt as written.
        enhance_prompt="no",
        # Token merging is on by default there too and changes the image slightly.
        tomesd="no",
    )


def realtime_schema(init_image):
    # Only the fields the realtime schema declares: no model_id (the server's --default-model runs) and no
    # scheduler (the model's own runs).
    return RealtimeImage2ImageSchema(
        prompt=PROMPT,
        init_image=init_image,
        negative_prompt=NEGATIVE_PROMPT,
        strength=STRENGTH,
        seed=SEED,
        guidance_scale=GUIDANCE,
        num_inference_steps=STEPS,
        width=SIZE,
        height=SIZE,
        samples=1,
    )


# Text-to-image: cases t2i-sd1-ddim-s42 (v6 / enterprise images, DDIM) and t2i-sd1-pndm-s42 (realtime: the
# model's own PNDM).
TEXT_STEPS = 8


def community_text_schema():
    return Text2Image(prompt=PROMPT, model_id=MODEL_ID, negative_prompt=NEGATIVE_PROMPT, width=SIZE, height=SIZE,
                      samples=1, num_inference_steps=TEXT_STEPS, seed=SEED, guidance_scale=GUIDANCE,
                      scheduler=SCHEDULER, clip_skip=1, enhance_prompt="no", tomesd="no")


def realtime_text_schema():
    return RealtimeText2ImageSchema(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, seed=SEED,
                                    guidance_scale=GUIDANCE, num_inference_steps=TEXT_STEPS, width=SIZE,
                                    height=SIZE, samples=1)


def shorten(value):
    """The request body as recorded: the init image's base64 is replaced by its length."""
    out = {}
    for k, v in value.items():
        if k == "init_image" and isinstance(v, str) and len(v) > 80:
            out[k] = "<base64, %d chars>" % len(v)
        else:
            out[k] = v
    return out


def main():
    if len(sys.argv) != 5:
        sys.exit("usage: sdk_client.py BASE_URL KEY INIT_IMAGE_BASE64_FILE OUT_JSON")
    base_url, key, init_file, out_path = sys.argv[1:]
    with open(init_file) as f:
        init_image = f.read().strip()

    # fetch() sleeps `fetch_timeout` seconds between tries and gives up after `fetch_retry` tries.
    client = Client(api_key=key, fetch_retry=120, fetch_timeout=1)
    client.base_url = base_url.rstrip("/") + "/api/"

    calls = []
    original_post = client.post

    def recording_post(endpoint, data=None):
        sent = {"key": client.api_key, **(data or {})}
        record = {"url": endpoint, "body": shorten(sent)}
        calls.append(record)
        try:
            answer = original_post(endpoint, data)
        except Exception as e:  # the SDK raises on any HTTP status but 200
            record["error"] = str(e)
            raise
        record["status"] = answer.get("status") if isinstance(answer, dict) else None
        return answer

    client.post = recording_post

    # The API objects copy client.base_url when they are made, so they are made after it is set.
    apis = [
        ("v6_images", Community(client=client), community_schema),
        ("enterprise_images", Community(client=client, enterprise=True), community_schema),
        ("v6_realtime", Realtime(client=client), realtime_schema),
        ("enterprise_realtime", Realtime(client=client, enterprise=True), realtime_schema),
    ]

    results = {}
    # Submit everything first, so that on a queueing server the later jobs are still waiting when fetched.
    for name, api, schema in apis:
        entry = {"api_base_url": api.base_url}
        results[name] = entry
        first = len(calls)
        try:
            entry["submit"] = api.image_to_image(schema(init_image))
        except Exception:
            entry["submit_error"] = traceback.format_exc()
        entry["submit_calls"] = calls[first:]
    # Text-to-image through the same four APIs (`<name>_text2img`).
    text_schemas = {"v6_images": community_text_schema, "enterprise_images": community_text_schema,
                    "v6_realtime": realtime_text_schema, "enterprise_realtime": realtime_text_schema}
    for name, api, _ in list(apis):
        entry = {"api_base_url": api.base_url}
        results[name + "_text2img"] = entry
        first = len(calls)
        try:
            entry["submit"] = api.text_to_image(text_schemas[name]())
        except Exception:
            entry["submit_error"] = traceback.format_exc()
        entry["submit_calls"] = calls[first:]
        apis.append((name + "_text2img", api, None))
    for name, api, _ in apis:
        entry = results[name]
        submitted = entry.get("submit")
        if not isinstance(submitted, dict) or submitted.get("id") is None:
            continue
        first = len(calls)
        try:
            # The API answers `id` as a number; the SDK concatenates it into the URL, so it takes a string.
            entry["fetch"] = api.fetch(str(submitted["id"]))
        except Exception:
            entry["fetch_error"] = traceback.format_exc()
        entry["fetch_calls"] = calls[first:]

    with open(out_path, "w") as f:
        json.dump({"base_url": client.base_url, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
