#!/usr/bin/env bash
# The GPU check (issue 24), prepared where there is no GPU and run with one command where there is.
#
# Pack (here; no GPU needed):
#     scripts/gpu_check.sh [--out DIR]                  (default DIR: target/gpu-check)
#   builds the CUDA binary as scripts/check_cuda_build.sh does (the toolchain of scripts/lib/cuda_toolchain.sh,
#   CARGO_TARGET_DIR target/cuda, PTX for compute capability $CUDA_COMPUTE_CAP, default 80, which the driver
#   JIT-compiles for newer GPUs), strips it, and packs into DIR, at most 48 MiB:
#     run.sh             this script
#     MANIFEST.json      what was packed (commit, cases, models, sizes)
#     payload.tar.xz     pictor (the stripped binary), fixtures/ (the parity cases below with their reference
#                        PNGs, init images, models and LoRAs), scripts/bench_pytorch.py, assets/clip-tokenizer/
#   The fixture models do not all fit: sd1-tiny, sd2-tiny and pix2pix-tiny are packed (SDXL's tiny model,
#   26.6 MiB compressed, is left out); the cases are in PACKED_CASES below.
#
# Run (on a machine with an NVIDIA GPU and its driver, CUDA 13 libraries in python3's site-packages, e.g.
# PyTorch's nvidia-* wheels, and no network):
#     scripts/gpu_check.sh --run DIR     or     DIR/run.sh
#   unpacks the payload into a temporary folder, finds the CUDA libraries (site-packages/nvidia/*/lib, for
#   LD_LIBRARY_PATH), reads the GPU's name and driver from nvidia-smi, and runs, each step under a time limit
#   (the limits sum to 450 s, under 8 minutes):
#     parity fp32     pictor check-fixtures --device cuda --precision fp32: every packed case within
#                     max |Δ| ≤ 3 and mean |Δ| ≤ 0.5 of diffusers' PNGs                             (90 s)
#     parity fp16     the same in float16: every image at ≥ 35 dB PSNR against the PNGs            (70 s)
#     pictor unet     pictor bench --device cuda --precision fp16: SD 1.5 UNet, 512², batch 2 (one
#                     guided step), 10 timed calls: steps per second                               (50 s)
#     pictor img2img  the same for a whole img2img request, 512², 20 steps (15 run at strength 0.75),
#                     one image, 2 timed runs: seconds                                             (70 s)
#     PyTorch         if `python3 -c 'import diffusers'` works (20 s): scripts/bench_pytorch.py
#                     --device cuda --precision fp16, the same two shapes                          (60 s, 80 s)
#   and prints one JSON object with every figure (a figure that could not be had is null, with the reason
#   in its group's "error"); exit status 0 when everything ran and passed. Progress goes to stderr.
#   Options: --allow-cpu       no GPU: run everything on the CPU instead (to test this script; the benchmarks
#                              in fp32, every time limit 4× longer); without it, a machine with no GPU gets
#                              the JSON with the reason and exit status 1
#            --bench-resolution N   the benchmarks' image side (default 512; with --allow-cpu e.g. 64)
#            --keep            keep the unpacked folder (its path is in the JSON)
#   Environment: PYTHON (default python3) finds the libraries and runs PyTorch.
set -euo pipefail

# The parity cases packed: SD 1 (PNDM, DDIM, Euler a, DPM++ 2M Karras, DPM++ 2M SDE Karras, UniPC, Heun,
# LCM; two images; no guidance; clip skip), SD 2 (v-prediction, 72×56), InstructPix2Pix, text-to-image and
# LoRAs (kohya, kohya + PEFT).
PACKED_CASES=(
    sd1-pndm-s42 sd1-ddim-s42 sd1-eulera-s42 sd1-pndm-s0-n2 sd1-pndm-cfg1-s0-n2 sd1-pndm-clipskip2-s0-n2
    sd1-dpm2m-karras-s11 sd1-dpm2msde-karras-s11 sd1-unipc-s11 sd1-heun-s11 sd1-lcm-s11
    sd2-ddim-s7-n2 sd2-euler-s7 sd2-dpm2m-karras-s5
    p2p-eulera-s3 p2p-ddim-s3
    t2i-sd1-euler-s7 t2i-sd1-eulera-80x48-s3-n2 t2i-sd1-dpm2m-karras-s11 t2i-sd2-ddim-s5
    kohya-0.8 kohya-0.6-peft-1.0
)
MAX_MIB=48

here=$(cd "$(dirname "$0")" && pwd)

run_folder=""
pack_out=""
if [ "${1:-}" = "--run" ]; then
    [ $# -ge 2 ] || { echo "usage: $0 --run FOLDER [--allow-cpu] [--bench-resolution N] [--keep]" >&2; exit 2; }
    run_folder=$2
    shift 2
elif [ -f "$here/MANIFEST.json" ] && [ -f "$here/payload.tar.xz" ]; then
    # FOLDER/run.sh: this copy lives in a packed folder.
    run_folder=$here
elif [ "${1:-}" = "--out" ]; then
    pack_out=${2:?--out needs a folder}
    shift 2
fi

if [ -n "$run_folder" ]; then
    py=${PYTHON:-python3}
    if ! command -v "$py" >/dev/null 2>&1; then
        printf '{"ok": false, "error": "%s not found: the check needs python3 (to unpack, find the CUDA libraries and print this JSON)"}\n' "$py"
        exit 1
    fi
    exec "$py" - "$run_folder" "$@" <<'PY'
import json, os, platform, shutil, signal, socket, subprocess, sys, tarfile, tempfile, time, datetime
from pathlib import Path

START = time.monotonic()
folder = Path(sys.argv[1]).resolve()
argv = sys.argv[2:]


def option(name, default):
    if name in argv:
        i = argv.index(name)
        if i + 1 >= len(argv):
            sys.exit(f"{name} needs a value")
        return argv[i + 1]
    return default


ALLOW_CPU = "--allow-cpu" in argv
KEEP = "--keep" in argv
BENCH_RES = int(option("--bench-resolution", "512"))
# The step limits below sum to BUDGET seconds, so the whole run stays under 8 minutes; on the CPU
# (--allow-cpu) every limit is SCALE times longer.
SCALE = 4 if ALLOW_CPU else 1
BUDGET = 450.0 * SCALE
known = {"--allow-cpu", "--keep", "--bench-resolution"}
for a in argv:
    if a.startswith("--") and a not in known:
        sys.exit(f"unknown option {a}")


def log(msg):
    print(f"[gpu_check {time.monotonic() - START:5.0f} s] {msg}", file=sys.stderr, flush=True)


def tail(text, lines=3):
    return " | ".join((text or "").strip().splitlines()[-lines:])


def run(cmd, limit, env=None):
    """Runs cmd (its own process group, killed whole on timeout) for at most `limit` seconds, or what is left
    of the budget. Returns (exit status or None, stdout, stderr, seconds, error or None)."""
    left = START + BUDGET + 20 - time.monotonic()
    if left < 5:
        return None, "", "", 0.0, "skipped: the time budget is spent"
    limit = min(limit * SCALE, left)
    t0 = time.monotonic()
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             text=True, env=env, start_new_session=True)
    except OSError as e:
        return None, "", "", 0.0, f"{cmd[0]}: {e}"
    try:
        out, err = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return None, out, err, time.monotonic() - t0, f"timed out after {limit:.0f} s: {tail(err)}"
    return p.returncode, out, err, time.monotonic() - t0, None


def last_json(text):
    text = (text or "").strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


result = {
    "check": "pictor GPU check (issue 24): scripts/gpu_check.sh --run",
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "host": socket.gethostname(),
    "cpu": cpu_model(),
    "folder": str(folder),
    "packed": None,
    "device": None,
    "gpu": {"name": None, "driver": None, "memory": None, "compute_cap": None, "error": None},
    "cuda_libraries": {"dirs": [], "missing": [], "error": None},
    "parity_fp32": None,
    "parity_fp16": None,
    "pictor_unet": None,
    "pictor_img2img": None,
    "pytorch": None,
    "pytorch_unet": None,
    "pytorch_img2img": None,
    "ok": False,
    "seconds": None,
}
FIGURES = ["parity_fp32", "parity_fp16", "pictor_unet", "pictor_img2img", "pytorch", "pytorch_unet",
           "pytorch_img2img"]


def blank(key, reason):
    """The group `key` with its figures null and `reason` as its error."""
    if key.startswith("parity"):
        figures = {"pass": None, "passed": None, "failed": None, "min_psnr_db": None, "cases": None}
    elif key.endswith("unet"):
        figures = {"steps_per_s": None, "median_s": None}
    elif key.endswith("img2img"):
        figures = {"seconds": None, "median_s": None}
    else:
        figures = {}
    return dict(figures, error=reason)


def finish(code):
    for key in FIGURES:
        if result[key] is None:
            result[key] = blank(key, "not run")
    result["seconds"] = round(time.monotonic() - START, 1)
    print(json.dumps(result, indent=2))
    sys.exit(code)


def fail_all(reason):
    for key in FIGURES:
        if result[key] is None:
            result[key] = blank(key, reason)
    finish(1)


# ---- unpack
try:
    result["packed"] = json.loads((folder / "MANIFEST.json").read_text())
    result["packed"].pop("files", None)
except (OSError, ValueError) as e:
    fail_all(f"{folder}: not a packed folder ({e})")
work = Path(tempfile.mkdtemp(prefix="pictor-gpu-check-"))
try:
    log(f"unpacking into {work}")
    with tarfile.open(folder / "payload.tar.xz", "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(work, filter="data")
        else:
            tar.extractall(work)
except (OSError, tarfile.TarError) as e:
    fail_all(f"unpacking payload.tar.xz: {e}")
if KEEP:
    result["unpacked"] = str(work)
pictor = work / "pictor"
fixtures = work / "fixtures"
os.chmod(pictor, 0o755)

# ---- CUDA libraries: the nvidia-* wheels in python3's site-packages (nvidia/<name>/lib, nvidia/cu13/lib)
roots = []
try:
    import site
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
except Exception:
    pass
roots += [p for p in sys.path if p.endswith("-packages")]
lib_dirs = []
for root in dict.fromkeys(roots):
    base = Path(root) / "nvidia"
    if base.is_dir():
        for lib in sorted(base.glob("*/lib")) + sorted(base.glob("*/*/lib")):
            if lib.is_dir() and any(lib.glob("*.so*")) and str(lib) not in lib_dirs:
                lib_dirs.append(str(lib))
result["cuda_libraries"]["dirs"] = lib_dirs
env = dict(os.environ)
env["LD_LIBRARY_PATH"] = ":".join(lib_dirs + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
env.setdefault("PICTOR_LOG", "warn")
rc, out, err, _, problem = run(["ldd", str(pictor)], 20, env)
if rc is not None:
    missing = sorted({line.split()[0] for line in out.splitlines() if "not found" in line})
    result["cuda_libraries"]["missing"] = missing
    if missing:
        result["cuda_libraries"]["error"] = ("not found in python3's site-packages/nvidia/* or LD_LIBRARY_PATH: "
                                             + ", ".join(missing))
else:
    result["cuda_libraries"]["error"] = f"ldd: {problem or tail(err)}"

# ---- the GPU
rc, out, err, _, problem = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                                "--format=csv,noheader"], 10)
if rc == 0 and out.strip():
    fields = [f.strip() for f in out.strip().splitlines()[0].split(",")]
    fields += [None] * (4 - len(fields))
    result["gpu"].update(name=fields[0], driver=fields[1], memory=fields[2], compute_cap=fields[3])
    device = "cuda"
else:
    result["gpu"]["error"] = problem or f"nvidia-smi: exit status {rc}: {tail(err or out)}"
    device = None
if device is None:
    if not ALLOW_CPU:
        result["device"] = None
        if not KEEP:
            shutil.rmtree(work, ignore_errors=True)
        fail_all(f"no NVIDIA GPU ({result['gpu']['error']}); --allow-cpu runs the check on the CPU")
    device = "cpu"
result["device"] = device
log(f"device {device}: {result['gpu']['name'] or 'no GPU'}, driver {result['gpu']['driver']}")
if result["cuda_libraries"]["missing"]:
    log(result["cuda_libraries"]["error"])

# ---- parity
def parity(precision, limit):
    log(f"parity {precision} on {device} ...")
    rc, out, err, secs, problem = run([str(pictor), "check-fixtures", str(fixtures), "--device", device,
                                       "--precision", precision, "--json"], limit, env)
    res = dict(blank("parity", None), precision=precision, seconds=round(secs, 1))
    doc = last_json(out) if problem is None else None
    if doc is None or "cases" not in doc:
        res["error"] = problem or f"exit status {rc}: {tail(err or out)}"
        return res
    cases = {}
    worst_psnr = None
    for c in doc["cases"]:
        e = {"pass": c["pass"]}
        imgs = c["images"]
        if imgs:
            e["max_abs_diff"] = max(i["max_abs_diff"] for i in imgs)
            e["mean_abs_diff"] = round(max(i["mean_abs_diff"] for i in imgs), 4)
            finite = [i["psnr_db"] for i in imgs if i["psnr_db"] is not None]
            e["psnr_db"] = round(min(finite), 2) if finite else None  # null: equal to the reference
            if finite:
                worst_psnr = min(finite) if worst_psnr is None else min(worst_psnr, min(finite))
        if c.get("error"):
            e["error"] = c["error"]
        cases[c["name"]] = e
    res.update(**{"pass": doc["pass"], "passed": doc["passed"], "failed": doc["failed"], "cases": cases,
                  "tolerance": doc.get("tolerance"), "min_psnr_db": worst_psnr and round(worst_psnr, 2),
                  "load_seconds": doc.get("load_seconds")})
    if not doc["pass"]:
        res["error"] = f"{doc['failed']} of {doc['failed'] + doc['passed']} cases outside the tolerance"
    return res


result["parity_fp32"] = parity("fp32", 90)
result["parity_fp16"] = parity("fp16", 70)

# ---- Pictor's benchmarks (full-size SD 1.5, random weights)
bench_precision = "fp16" if device == "cuda" else "fp32"


def pictor_bench(component, extra, limit):
    log(f"pictor bench {component} {BENCH_RES}² {bench_precision} on {device} ...")
    cmd = [str(pictor), "bench", "--device", device, "--precision", bench_precision, "--component", component,
           "--resolution", str(BENCH_RES), *extra, "--json"]
    rc, out, err, secs, problem = run(cmd, limit, env)
    doc = last_json(out) if problem is None and rc == 0 else None
    res = {"command": " ".join(["pictor", *cmd[1:]]), "median_s": None, "times_s": None, "error": None}
    if doc is None:
        res["error"] = problem or f"exit status {rc}: {tail(err or out)}"
    else:
        res.update(median_s=doc["median_s"], times_s=doc["times_s"], peak_rss_mib=doc.get("peak_rss_mib"))
    return res


r = pictor_bench("unet", ["--batch", "2", "--iterations", "10"], 50)
r["steps_per_s"] = r["median_s"] and round(1.0 / r["median_s"], 3)
result["pictor_unet"] = r
r = pictor_bench("img2img", ["--batch", "1", "--steps", "20", "--iterations", "2"], 70)
r["seconds"] = r["median_s"]
result["pictor_img2img"] = r

# ---- PyTorch / diffusers, the same shapes
py = sys.executable
probe = ("import json, torch, diffusers, transformers; print(json.dumps({'torch': torch.__version__, "
         "'torch_cuda': torch.version.cuda, 'diffusers': diffusers.__version__, "
         "'transformers': transformers.__version__, 'cuda_available': torch.cuda.is_available()}))")
rc, out, err, _, problem = run([py, "-c", probe], 20)
versions = last_json(out) if rc == 0 else None
if versions is None:
    reason = f"diffusers does not import: {problem or tail(err)}"
    for key in ["pytorch", "pytorch_unet", "pytorch_img2img"]:
        result[key] = blank(key, reason)
elif device == "cuda" and not versions["cuda_available"]:
    reason = "torch sees no CUDA GPU"
    result["pytorch"] = dict(versions, error=reason)
    result["pytorch_unet"] = blank("pytorch_unet", reason)
    result["pytorch_img2img"] = blank("pytorch_img2img", reason)
else:
    result["pytorch"] = dict(versions, error=None)

    def pytorch_bench(component, extra, limit):
        log(f"PyTorch {component} {BENCH_RES}² {bench_precision} on {device} ...")
        cmd = [py, str(work / "scripts" / "bench_pytorch.py"), "--device", device, "--precision", bench_precision,
               "--component", component, "--resolution", str(BENCH_RES), *extra, "--json"]
        rc, out, err, secs, problem = run(cmd, limit)
        doc = last_json(out) if problem is None else None
        res = {"median_s": None, "times_s": None, "error": None}
        row = doc["rows"][0] if doc and doc.get("rows") else None
        if row is None or not row.get("pytorch"):
            res["error"] = problem or (row and row.get("pytorch_error")) or f"exit status {rc}: {tail(err or out)}"
        else:
            pt = row["pytorch"]
            res.update(median_s=pt["median_s"], times_s=pt["times_s"], peak_gpu_mib=pt.get("peak_gpu_mib"),
                       dtype=pt.get("dtype"), gpu=pt.get("gpu"))
        return res

    r = pytorch_bench("unet", ["--batch", "2", "--iterations", "10"], 60)
    r["steps_per_s"] = r["median_s"] and round(1.0 / r["median_s"], 3)
    result["pytorch_unet"] = r
    r = pytorch_bench("img2img", ["--batch", "1", "--steps", "20", "--iterations", "2"], 80)
    r["seconds"] = r["median_s"]
    result["pytorch_img2img"] = r

if not KEEP:
    shutil.rmtree(work, ignore_errors=True)
pictor_ok = all(result[k] and result[k].get("error") is None
                for k in ["parity_fp32", "parity_fp16", "pictor_unet", "pictor_img2img"])
pytorch_ok = result["pytorch"].get("error") is None and all(
    result[k].get("error") is None for k in ["pytorch_unet", "pytorch_img2img"])
# PyTorch missing is not a failure of the check (its figures are null with the reason); PyTorch failing is.
result["ok"] = bool(pictor_ok and (pytorch_ok or result["pytorch"].get("torch") is None))
finish(0 if result["ok"] else 1)
PY
fi

# ---------------------------------------------------------------------------------------------------------
# Pack
cd "$here/.."
out=${pack_out:-target/gpu-check}
[ $# -eq 0 ] || { echo "usage: $0 [--out DIR] | --run FOLDER [--allow-cpu] [--bench-resolution N] [--keep]" >&2; exit 2; }

# shellcheck source=lib/cuda_toolchain.sh
. scripts/lib/cuda_toolchain.sh
cuda_toolchain
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
nvcc --version | tail -1
build_start=$(date +%s)
cargo build --release -p pictor-cli --features cuda
echo "build: $(($(date +%s) - build_start)) s"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
strip -o "$stage/pictor" "$CARGO_TARGET_DIR/release/pictor"
mkdir -p "$stage/scripts" "$stage/assets"
cp scripts/bench_pytorch.py "$stage/scripts/"
cp -r assets/clip-tokenizer "$stage/assets/"
python3 - "$stage/fixtures" "${PACKED_CASES[@]}" <<'PY'
"""Copies the named cases of tests/fixtures into a fixtures folder of the same layout: their case files
(only those cases), reference PNGs and init images, and the models and LoRAs they use."""
import json, shutil, sys
from pathlib import Path

src = Path("tests/fixtures")
dst = Path(sys.argv[1])
names = sys.argv[2:]
# As pictor_engine::parity::CASE_FILES: the file and the folder its image paths are relative to.
case_files = [("cases.json", ""), ("txt2img/cases.json", ""), ("sdxl/cases.json", ""),
              ("lora_vae/cases.json", "lora_vae"), ("sdxl/lora_cases.json", "sdxl")]
found, files, models, loras = set(), set(), set(), set()
for name, under in case_files:
    cases = [c for c in json.loads((src / name).read_text()) if c["name"] in names]
    if not cases:
        continue
    (dst / name).parent.mkdir(parents=True, exist_ok=True)
    (dst / name).write_text(json.dumps(cases, indent=1))
    for c in cases:
        found.add(c["name"])
        files.update(str(Path(under) / p) for p in c.get("images", []))
        if c.get("init_image"):
            files.add(c["init_image"])
        models.add(c["model"])
        loras.update(l for l, _ in c.get("loras", []))
        if c.get("vae"):
            sys.exit(f"{c['name']}: VAE cases are not packed")
missing = set(names) - found
if missing:
    sys.exit(f"no such cases: {sorted(missing)}")
for f in sorted(files):
    (dst / f).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / f, dst / f)
for m in sorted(models):
    s, d = src / "models/checkpoints" / m, dst / "models/checkpoints" / m
    if s.is_dir():
        shutil.copytree(s, d)
    else:
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s, d)
for l in sorted(loras):
    (dst / "models/loras").mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "models/loras" / f"{l}.safetensors", dst / "models/loras")
print(f"packed {len(found)} cases, models {sorted(models)}, LoRAs {sorted(loras)}", file=sys.stderr)
PY

rm -rf "$out"
mkdir -p "$out"
echo "compressing ..."
tar -C "$stage" -cf - pictor fixtures scripts assets | xz -9e -T2 > "$out/payload.tar.xz"
cp scripts/gpu_check.sh "$out/run.sh"
chmod +x "$out/run.sh"
python3 - "$stage" "$out" "${PACKED_CASES[@]}" <<'PY'
import datetime, json, os, subprocess, sys
from pathlib import Path

stage, out, cases = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "crates", "scripts"],
                       capture_output=True, text=True).stdout.strip() != ""
files = {str(p.relative_to(stage)): p.stat().st_size for p in sorted(stage.rglob("*")) if p.is_file()}
models = sorted(p.name for p in (stage / "fixtures/models/checkpoints").iterdir())
manifest = {
    "packed": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "commit": commit + ("+changes" if dirty else ""),
    "cuda": "13.0 (NVIDIA's PyPI wheels)",
    "compute_cap": os.environ.get("CUDA_COMPUTE_CAP"),
    "binary_bytes": files["pictor"],
    "unpacked_bytes": sum(files.values()),
    "cases": cases,
    "models": models,
    "files": files,
}
(out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
PY
mib=$(du -sm "$out" | cut -f1)
bytes=$(du -sb "$out" | cut -f1)
echo "packed $out: $bytes bytes ($(du -sh "$out" | cut -f1)), stripped binary $(stat -c %s "$stage/pictor") bytes"
if [ "$bytes" -gt $((MAX_MIB * 1024 * 1024)) ]; then
    echo "error: $out is over $MAX_MIB MiB ($mib MiB)" >&2
    exit 1
fi
echo "run it on a GPU machine: $out/run.sh   (or scripts/gpu_check.sh --run $out)"
