#!/usr/bin/env python3
"""Load and fault run against a real `pictor serve` on loopback, bounded in count and time (never in CI).

    cargo build --release -p pictor-cli
    python3 scripts/load_fault.py [--clients 8] [--requests 6] [--keys 3] [--kills 2] [--disk-mib 0]
                                  [--min-free-mib 1] [--grow-after S] [--pace 0] [--seconds 300]

N client threads send requests across K keys (mixed sizes and routes: v6 img2img and text2img, v7 text-to-image),
each with an Idempotency-Key, and resend a request whose answer they lost (connection refused or reset while the
server is down) with the same key, as a careful client would. Meanwhile the server is killed with SIGKILL at
random moments and started again on the same data folder. With `--disk-mib N` (root only) the data folder is a
tmpfs of N MiB, so the disk fills up during the run, and is made 8 times larger at `--grow-after` seconds (an
operator freeing space), so that jobs held back by the full disk can be seen to finish. At the end every accepted job is polled until it is final.

Other faults, each optional: `--webhooks` (every request names a webhook on loopback that answers slowly for
20 s, then is down for 20 s, then comes back), `--lock-db S` (another process holds SQLite's write lock on the
job database for S seconds), `--postgres [--postgres-down S]` (the job store is a throwaway PostgreSQL, crashed
8 s into the run and started again S seconds later), `--s3` (outputs and init images in a bucket of the tests' S3 server), `--slow-clients N` (connections that send their headers one byte every 2 s).

Prints one JSON object: accepted, rejected (by reason), finished, failed, lost (accepted ids that never became
final or vanished), duplicated (idempotency keys that got more than one job), kills, webhooks expected /
delivered / missing / repeated, how long slow clients were kept, peak RSS of the server, p50/p95 of the answer
time and of the time to a final job. Standard library only.
"""

import argparse
import base64
import http.server
import sqlite3
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, binary, data, port, keys, extra, env=None):
        self.binary, self.data, self.port, self.keys, self.extra = binary, data, port, keys, extra
        self.env = {**os.environ, **(env or {})}
        self.proc = None
        self.peak_rss_kib = 0
        self.log = open(Path(data).parent / "server.log", "ab")

    def start(self):
        args = [str(self.binary), "serve", "--listen", f"127.0.0.1:{self.port}", "--no-demo",
                "--models-dir", str(FIX / "models"), "--data-dir", str(self.data),
                "--default-model", "sd1-tiny", "--admin-key", "admin-key-load"] + self.extra
        for k in self.keys:
            args += ["--api-key", k]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except Exception:  # noqa: BLE001 -- not up yet
                time.sleep(0.1)
        raise SystemExit("the server did not become healthy")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def sample_rss(self):
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
        except (OSError, AttributeError):
            pass


def post(url, body, headers=None, timeout=120):
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None


class WebhookReceiver:
    """A webhook endpoint on loopback that is slow (each answer after `slow` seconds) for its first `slow_for`
    seconds, then down (its port closed: connection refused) for `down_for` seconds, then healthy. Records the
    track_id of every POST."""

    def __init__(self, slow, slow_for, down_for):
        self.slow, self.down_from, self.down_until = slow, time.time() + slow_for, time.time() + slow_for + down_for
        self.received = {}
        self.lock = threading.Lock()
        self.port = free_port()
        self.httpd = None
        self.serving = False
        self._start()

    def _start(self):
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 -- the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if time.time() < receiver.down_from:
                    time.sleep(receiver.slow)
                try:
                    track = json.loads(body).get("track_id")
                except ValueError:
                    track = None
                with receiver.lock:
                    receiver.received[track] = receiver.received.get(track, 0) + 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.serving = True

    def tick(self):
        """Takes the receiver down or brings it back as its schedule says."""
        now = time.time()
        if self.serving and self.down_from <= now < self.down_until:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.serving = False
        elif not self.serving and now >= self.down_until:
            self._start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hook"


class Postgres:
    """A throwaway PostgreSQL (Debian's binaries) on a free loopback port, which can be crashed and started again."""

    def __init__(self):
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
        if not bins:
            raise SystemExit("--postgres needs Debian's postgresql package")
        # Its own folder under /tmp (the run's folder is private to root; initdb refuses to run as root).
        self.bin, self.dir, self.port = bins[-1], Path(tempfile.mkdtemp(prefix="pictor-load-pg-")), free_port()
        self.as_user = []
        if os.geteuid() == 0:
            subprocess.run(["chown", "postgres", str(self.dir)], check=True)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        subprocess.run(self.as_user + [str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
                                       "-A", "trust", "--no-sync"], check=True, stdout=subprocess.DEVNULL)
        self.start()

    def start(self):
        subprocess.run(self.as_user + [str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-l",
                                       str(self.dir / "server.log"), "-w", "-t", "30", "start", "-o",
                                       f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"],
                       check=True, stdout=subprocess.DEVNULL)

    def crash(self):
        subprocess.run(self.as_user + [str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate",
                                       "stop"], check=False, stdout=subprocess.DEVNULL)

    @property
    def url(self):
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"


def hold_db_lock(path, seconds):
    """Holds SQLite's write lock on the job database for `seconds` (another process writing, a backup)."""
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        db.execute("COMMIT")
        db.close()
    except sqlite3.Error as e:
        print(f"could not lock the database: {e}", file=sys.stderr)


def slow_client(port, results):
    """Sends a request's headers one byte every 2 s and records how long the server keeps the connection."""
    t0 = time.time()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            for byte in b"POST /api/v6/images/text2img HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n":
                s.sendall(bytes([byte]))
                time.sleep(2)
    except OSError:
        pass
    results.append(time.time() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=6, help="per client")
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--disk-mib", type=int, default=0, help="data folder on a tmpfs this large (root only)")
    ap.add_argument("--min-free-mib", type=int, default=1,
                    help="with --disk-mib: the server's --min-free-disk-mib (new jobs get 503 below it)")
    ap.add_argument("--grow-after", type=float, default=None,
                    help="with --disk-mib: seconds after the start at which the tmpfs is made 8 times larger, as an "
                         "operator freeing space would (default: half of --seconds)")
    ap.add_argument("--webhooks", action="store_true",
                    help="every request names a webhook on loopback that is slow (3 s) for 20 s, then down for 20 s")
    ap.add_argument("--lock-db", type=float, default=0.0,
                    help="seconds to hold SQLite's write lock on the job database, from 5 s after the start")
    ap.add_argument("--postgres", action="store_true",
                    help="the job store is a throwaway PostgreSQL (Debian's package) instead of SQLite")
    ap.add_argument("--postgres-down", type=float, default=0.0,
                    help="with --postgres: crash it (pg_ctl -m immediate) 8 s after the start, start it after S s")
    ap.add_argument("--s3", action="store_true",
                    help="outputs and init images in an S3 bucket (the tests' S3 server, target/release/pictor-test-s3: "
                         "cargo build --release -p pictor-testkit)")
    ap.add_argument("--slow-clients", type=int, default=0,
                    help="connections that send their headers one byte every 2 s (server: --header-timeout-secs 5)")
    ap.add_argument("--pace", type=float, default=0.0, help="seconds between one client's requests")
    ap.add_argument("--seconds", type=int, default=300, help="bound on the whole run")
    ap.add_argument("--binary", default=str(ROOT / "target" / "release" / "pictor"))
    args = ap.parse_args()
    started = time.time()
    deadline = started + args.seconds

    tmp = Path(tempfile.mkdtemp(prefix="pictor-load-"))
    data = tmp / "data"
    data.mkdir()
    mounted = False
    if args.disk_mib:
        if os.geteuid() != 0:
            raise SystemExit("--disk-mib needs root (it mounts a tmpfs)")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.disk_mib}m", "tmpfs", str(data)], check=True)
        mounted = True
    keys = [f"load-key-{i}" for i in range(args.keys)]
    port = free_port()
    extra = ["--workers", "1", "--max-queued-per-key", "20", "--header-timeout-secs", "5"]
    postgres = None
    if args.postgres:
        postgres = Postgres()
        extra += ["--database-url", postgres.url]
    s3, s3_env = None, {}
    if args.s3:
        s3 = subprocess.Popen([str(ROOT / "target" / "release" / "pictor-test-s3"), "pictor-load"],
                              stdout=subprocess.PIPE, text=True)
        s3_env = json.loads(s3.stdout.readline())
        extra += ["--storage", "s3://pictor-load"]
    receiver = None
    if args.webhooks:
        receiver = WebhookReceiver(slow=3, slow_for=20, down_for=20)
        extra += ["--allow-private-urls", "--webhook-attempts", "8", "--webhook-backoff", "1"]
    if args.disk_mib:
        extra += ["--min-free-disk-mib", str(args.min_free_mib)]
    server = ServerProcess(args.binary, data, port, keys, extra, s3_env)
    server.start()
    base = f"http://127.0.0.1:{port}"
    inits = {name: base64.b64encode((FIX / name).read_bytes()).decode() for name in ("init-64.png", "init-72x56.png")}

    lock = threading.Lock()
    accepted = {}  # idempotency key -> set of job ids
    owners = {}  # job id -> key
    rejected = {}
    answer_times = []

    def client(c):
        rng = random.Random(c)
        for r in range(args.requests):
            if time.time() > deadline:
                return
            if r:
                time.sleep(args.pace)
            key = keys[(c + r) % len(keys)]
            idem = f"client{c}-req{r}"
            kind = rng.choice(["img2img", "text2img", "v7"])
            size = rng.choice([(64, 64), (72, 56), (128, 128)])
            body = {"key": key, "prompt": f"load test {c}/{r}", "width": size[0], "height": size[1],
                    "num_inference_steps": rng.choice([2, 4, 8]), "seed": rng.randrange(2**32),
                    "enhance_prompt": "no", "tomesd": "no", "safety_checker": "no", "instant_response": "yes"}
            if kind == "img2img":
                body.update(init_image=inits[rng.choice(list(inits))], strength=0.75)
                route = "/api/v6/images/img2img"
            elif kind == "text2img":
                route = "/api/v6/images/text2img"
            else:
                route = "/api/v7/images/text-to-image"
            if receiver:
                body.update(webhook=receiver.url, track_id=idem)
            while time.time() < deadline:
                t0 = time.time()
                try:
                    status, answer = post(base + route, body, {"Idempotency-Key": idem}, timeout=30)
                except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                    time.sleep(0.5)  # the server is down: send the same request again
                    continue
                with lock:
                    answer_times.append(time.time() - t0)
                    if isinstance(answer, dict) and answer.get("id") is not None and answer.get("status") in (
                            "processing", "success"):
                        accepted.setdefault(idem, set()).add(int(answer["id"]))
                        owners[int(answer["id"])] = key
                    else:
                        reason = f"{status} {answer.get('message', '') if isinstance(answer, dict) else ''}"[:80]
                        rejected[reason] = rejected.get(reason, 0) + 1
                break

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    slow_results = []
    threads += [threading.Thread(target=slow_client, args=(port, slow_results)) for _ in range(args.slow_clients)]
    if postgres and args.postgres_down:
        def crash_later():
            time.sleep(8)
            postgres.crash()
            time.sleep(args.postgres_down)
            postgres.start()
        threading.Thread(target=crash_later, daemon=True).start()
    if args.lock_db:
        def lock_later():
            time.sleep(5)
            hold_db_lock(str(data / "jobs.db"), args.lock_db)
        threading.Thread(target=lock_later, daemon=True).start()
    for t in threads:
        t.start()
    # Kills at random moments of the first 20 s: while requests arrive and while jobs run.
    kills = 0
    kill_times = sorted(random.Random(99).uniform(0.5, 20) for _ in range(args.kills))

    grow_at = None
    if mounted:
        grow_at = started + (args.grow_after if args.grow_after is not None else args.seconds / 2)
    grown_at = None

    def maybe_kill():
        nonlocal kills, grow_at, grown_at
        server.sample_rss()
        if receiver:
            receiver.tick()
        if grow_at is not None and time.time() > grow_at:
            subprocess.run(["mount", "-o", f"remount,size={8 * args.disk_mib}m", str(data)], check=True)
            grow_at, grown_at = None, round(time.time() - started, 1)
        if kill_times and time.time() - started > kill_times[0]:
            kill_times.pop(0)
            server.kill()
            kills += 1
            time.sleep(random.Random(kills).uniform(0.2, 2.0))
            server.start()

    while any(t.is_alive() for t in threads) and time.time() < deadline:
        maybe_kill()
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=max(1, deadline - time.time()))

    # Every accepted job must end.
    finals = {}
    final_times = []
    pending = set(owners)
    def webhooks_missing():
        if not receiver:
            return []
        with receiver.lock:
            return [idem for idem, ids in accepted.items() if any(i in finals for i in ids)
                    and idem not in receiver.received]

    while (pending or kill_times or webhooks_missing()) and time.time() < deadline:
        maybe_kill()
        for job_id in list(pending):
            try:
                status, answer = post(f"{base}/api/v6/images/fetch/{job_id}", {"key": owners[job_id]}, timeout=10)
            except OSError:
                continue
            if isinstance(answer, dict) and answer.get("status") in ("success", "failed"):
                finals[job_id] = answer["status"]
                final_times.append(time.time() - started)
                pending.discard(job_id)
            elif isinstance(answer, dict) and answer.get("status") == "error" and status < 500:
                # (A 503 while the database is down is "ask again", not an answer about the job.)
                print(f"job {job_id} lost: {status} {answer}", file=sys.stderr)
                finals[job_id] = "lost"
                pending.discard(job_id)
        time.sleep(0.5)
    server.kill()
    if s3:
        s3.kill()
    if postgres:
        postgres.crash()
        subprocess.run(["rm", "-rf", str(postgres.dir)], check=False)
    if mounted:
        subprocess.run(["umount", str(data)], check=False)

    def pct(values, p):
        if not values:
            return None
        values = sorted(values)
        return round(values[min(len(values) - 1, int(p / 100 * len(values)))], 3)

    summary = {
        "clients": args.clients, "requests_per_client": args.requests, "keys": args.keys,
        "disk_mib": args.disk_mib or None,
        "accepted": len(owners),
        "rejected": rejected,
        "finished": sum(1 for s in finals.values() if s == "success"),
        "failed": sum(1 for s in finals.values() if s == "failed"),
        "lost": sum(1 for s in finals.values() if s == "lost") + len(pending),
        "duplicated": sum(1 for ids in accepted.values() if len(ids) > 1),
        "kills": kills,
        "disk_grown_at_seconds": grown_at,
        "db_locked_seconds": args.lock_db or None,
        "postgres_down_seconds": (args.postgres_down or None) if postgres else None,
        "storage": "s3" if s3 else "folder",
        "job_store": "postgres" if postgres else "sqlite",
        "webhooks": None if not receiver else {
            "expected": sum(1 for ids in accepted.values() if any(i in finals for i in ids)),
            "delivered": len([k for k in receiver.received if k in accepted]),
            "missing": len(webhooks_missing()),
            "repeated": sum(n - 1 for n in receiver.received.values() if n > 1),
        },
        "slow_clients_closed_after_seconds": [round(t, 1) for t in sorted(slow_results)] or None,
        "peak_rss_mib": round(server.peak_rss_kib / 1024, 1),
        "answer_seconds_p50": pct(answer_times, 50),
        "answer_seconds_p95": pct(answer_times, 95),
        "final_seconds_p50": pct(final_times, 50),
        "final_seconds_p95": pct(final_times, 95),
        "wall_seconds": round(time.time() - started, 1),
    }
    print(json.dumps(summary, indent=2))
    ok = summary["lost"] == 0 and summary["duplicated"] == 0
    if receiver:
        ok = ok and summary["webhooks"]["missing"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
