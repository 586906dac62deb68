"""Schemathesis hooks for scripts/schema_check.sh (loaded through SCHEMATHESIS_HOOKS).

Before each request:
- the key: `Authorization: Bearer` with the admin key on the enterprise management routes (their summary says
  "admin key"), the plain key everywhere else (every dialect takes a Bearer key); one request in 16 goes without
  it and one in 16 with a wrong key, for the dialects' 401s. A generated body `key` is kept half the time (it
  then wins over the header, so the invalid-key answer is exercised too) and replaced with the real key otherwise;
- the cost of a generation is bounded so the run fits in minutes on two cores: sizes above 128, steps above 4 and
  more than one sample are lowered (values that are not numbers are left for the server to refuse), and steps
  default to 4 on the generating routes. Everything else is as schemathesis generated it;
- an init image: a generated `init_image`/`image`/`base64_image` string or first `init_images` item is replaced
  half the time with a small PNG (base64), and a generated multipart `image` file with the PNG's bytes, so that
  positive cases reach the queue instead of all stopping at "not an image".

After each answer, with PICTOR_SCHEMA_TRACE set: one JSON line (operation, status, outcome) for the summary.
"""

import base64
import itertools
import json
import os
import re
import struct
import threading
import zlib

import schemathesis

_CALLS = itertools.count()
_CALLS_LOCK = threading.Lock()

KEY = os.environ["PICTOR_SCHEMA_KEY"]
ADMIN = os.environ["PICTOR_SCHEMA_ADMIN_KEY"]

MAX_SIDE = 128
MAX_STEPS = 4
SIDES = ("width", "height")
STEPS = ("steps", "num_inference_steps")
COUNTS = ("samples", "n", "batch_size", "n_iter")


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # One filter byte per row, then RGB pixels (a simple gradient).
    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 4 % 256, y * 4 % 256, 128)) for x in range(width)) for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


PNG = _png(64, 64)
PNG_B64 = base64.b64encode(PNG).decode()


def _number(value):
    """The value as a number when it is one (or a numeric string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _cap(body: dict, field: str, most: int) -> None:
    number = _number(body.get(field))
    if number is not None and number > most:
        body[field] = most if not isinstance(body[field], str) else str(most)


def _half(value) -> bool:
    """A stable coin: the same generated value always lands the same way."""
    return zlib.crc32(repr(value).encode()) % 2 == 0


def _generates(operation) -> bool:
    path = operation.path
    summary = operation.definition.raw.get("summary", "")
    return (
        " generation (" in summary
        or path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations", "/v1/images/edits")
    )


@schemathesis.hook
def before_call(context, case, kwargs):
    operation = case.operation
    admin = "admin key" in operation.definition.raw.get("summary", "")
    headers = dict(case.headers or {})
    with _CALLS_LOCK:
        call = next(_CALLS)
    if call % 16 == 7:
        headers.pop("Authorization", None)
    elif call % 16 == 15:
        headers["Authorization"] = "Bearer not-a-key"
    else:
        headers["Authorization"] = f"Bearer {ADMIN if admin else KEY}"
    case.headers = headers

    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("key"), str) and _half(body["key"]):
        body["key"] = ADMIN if admin else KEY
    for field in ("init_image", "image", "base64_image"):
        value = body.get(field)
        if isinstance(value, str) and _half(value):
            body[field] = PNG_B64
        elif isinstance(value, (bytes, bytearray)) and _half(value):
            body[field] = PNG
    images = body.get("init_images")
    if isinstance(images, list) and images and isinstance(images[0], str) and _half(images[0]):
        images[0] = PNG_B64
    if _generates(operation):
        for field in SIDES:
            _cap(body, field, MAX_SIDE)
        for field in STEPS:
            _cap(body, field, MAX_STEPS)
        for field in COUNTS:
            _cap(body, field, 1)
        if not any(field in body for field in STEPS):
            path = operation.path
            body["steps" if "pix2pix" in path or path.startswith("/sdapi/") else "num_inference_steps"] = MAX_STEPS
        size = body.get("size")
        if isinstance(size, str):
            m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", size)
            if m and (int(m[1]) > MAX_SIDE or int(m[2]) > MAX_SIDE):
                body["size"] = f"{min(int(m[1]), MAX_SIDE)}x{min(int(m[2]), MAX_SIDE)}"
        elif size is None and operation.path.startswith("/v1/images/generations"):
            body["size"] = "64x64"


TRACE = os.environ.get("PICTOR_SCHEMA_TRACE")
_TRACE_LOCK = threading.Lock()


@schemathesis.hook
def after_call(context, case, response):
    """With PICTOR_SCHEMA_TRACE set, one JSON line per answer: operation, status, and the ModelsLab `status` or
    the error text, for the run's summary."""
    if not TRACE:
        return
    outcome = None
    try:
        payload = response.json()
    except Exception:
        payload = None
    if isinstance(payload, dict):
        if isinstance(payload.get("status"), str):
            outcome = payload["status"]
        error = payload.get("error")
        message = payload.get("message") or payload.get("detail")
        if message is None and isinstance(error, dict):
            message = error.get("message")
        if outcome in (None, "error") and message is not None:
            outcome = f"{outcome or 'error'}: {str(message)[:160]}"
    line = json.dumps({"op": f"{case.operation.method.upper()} {case.operation.path}",
                       "generates": _generates(case.operation), "code": response.status_code,
                       "outcome": outcome})
    with _TRACE_LOCK:
        with open(TRACE, "a") as f:
            f.write(line + "\n")
