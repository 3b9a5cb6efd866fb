"""Load-test the Gradio demo: latency, throughput and errors at 1, 8 and 32 concurrent users, and server memory.

    python scripts/load_test_demo.py --url http://127.0.0.1:7860            # a demo that is already running
    python scripts/load_test_demo.py --start --checkpoint runs/quickstart/<run>/best.pt
    python scripts/load_test_demo.py --start --checkpoint best.pt --images photos/ --concurrency 1 4 16 --rounds 3

Every simulated user is its own gradio_client session that uploads a photo and asks for its caption, as the page
does: through a one-call endpoint that takes the file when the demo has one, else the page's own two events (the
upload stores the file in the session, then the captioning event reads it). With --start the demo runs in a child
process on a free port, its resident memory (VmRSS) is printed before, between and after the rounds to show that it
returns to its base once the demo has forgotten the idle sessions (--forget-after, the demo's own option: an hour by
default, 30 s here), and the child is stopped at the end. Only localhost is ever contacted; the number of requests
and the time of each level are bounded.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
MAX_REQUESTS = 1000  # over all levels and passes: a load test, not a stress test


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7860", help="a running demo (localhost only)")
    p.add_argument("--start", action="store_true", help="launch demo/app.py on a free port and stop it at the end")
    p.add_argument("--checkpoint", help="with --start: the model the demo serves")
    p.add_argument("--images", help="folder of photos to upload (default: generated synthetic-shapes PNGs)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="simultaneous users per level")
    p.add_argument("--rounds", type=int, default=2, help="requests each user sends, one after the other")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--level-timeout", type=float, default=180.0, help="seconds a level may take; late = error")
    p.add_argument("--passes", type=int, default=1,
                   help="run the levels this many times: memory that stops growing after the first is no leak")
    p.add_argument("--forget-after", type=float, default=30.0,
                   help="with --start: seconds after which the demo forgets idle sessions and cached files")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds to wait before the final memory reading (with --start, twice --forget-after more)")
    p.add_argument("--api-name", help="the demo's one-call captioning endpoint (default: found from its API)")
    return p


# ------------------------------------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen | None, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"error: the demo exited with code {proc.returncode} before it served {url}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise SystemExit(f"error: nothing answered at {url} within {timeout:.0f} s")


def start_demo(checkpoint: str, forget_after: float, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "demo" / "app.py"),  # run in REPO: the path made absolute
                                 "--checkpoint", str(Path(checkpoint).resolve()), "--host", "127.0.0.1",
                                 "--port", str(port), "--forget-after", str(forget_after)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return proc, f"http://127.0.0.1:{port}/"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mib(pid: int) -> float | None:
    """Resident memory of process `pid` in MiB (VmRSS in /proc/<pid>/status), None where there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------------ the requests


@dataclass
class Calls:
    """How one user asks for a caption: (api_name, kwargs builder) steps, run in order in one session."""

    steps: list[tuple[str, Callable[[str], dict]]] = field(default_factory=list)
    description: str = ""


def find_calls(api: dict, beam_size: int, max_len: int, api_name: str | None) -> Calls:
    """Read the demo's API: a one-call endpoint taking the file, else the page's upload event + captioning event."""
    from gradio_client import handle_file

    endpoints = api["named_endpoints"]

    def arguments(name: str, path: str | None) -> dict:
        kwargs = {}
        for p in endpoints[name]["parameters"]:
            key, component = p["parameter_name"], p["component"]
            if component in ("File", "Image"):
                kwargs[key] = handle_file(path)
            elif "beam" in key:
                kwargs[key] = beam_size
            elif "len" in key:
                kwargs[key] = max_len
        return kwargs

    def takes_file(name: str) -> bool:
        return any(p["component"] in ("File", "Image") for p in endpoints[name]["parameters"])

    def captions(name: str) -> bool:
        return any(r["component"] == "Html" for r in endpoints[name]["returns"])

    if api_name is not None:
        name = "/" + api_name.lstrip("/")
        if name not in endpoints:
            raise SystemExit(f"error: the demo has no endpoint {name}; it has {', '.join(endpoints)}")
        return Calls([(name, lambda path: arguments(name, path))], name)
    one_call = [n for n in endpoints if takes_file(n) and captions(n)]
    if one_call:
        name = one_call[0]
        return Calls([(name, lambda path: arguments(name, path))], name)
    upload = [n for n in endpoints if takes_file(n) and not endpoints[n]["returns"]]
    caption = [n for n in endpoints if captions(n) and any("beam" in p["parameter_name"]
                                                           for p in endpoints[n]["parameters"])]
    if not upload or not caption:
        raise SystemExit(f"error: cannot tell how to caption an upload from the endpoints {', '.join(endpoints)}; "
                         "name one with --api-name")
    return Calls([(upload[0], lambda path: arguments(upload[0], path)),
                  (caption[0], lambda path: arguments(caption[0], None))], f"{upload[0]} then {caption[0]}")


def caption_once(client, calls: Calls, path: str, timeout: float) -> str | None:
    """One captioned upload; None when it worked, else why not."""
    result = None
    for name, build in calls.steps:
        result = client.submit(api_name=name, **build(path)).result(timeout=timeout)
    html = result[1] if isinstance(result, (list, tuple)) and len(result) > 1 else ""
    if "caption-problem" in str(html) or "caption-text" not in str(html):
        return f"no caption: {str(html)[:120]}"
    return None


def run_level(clients: list, calls: Calls, images: list[Path], rounds: int, timeout: float
              ) -> tuple[list[float], list[str], float]:
    """Every client sends `rounds` captioned uploads one after the other, all clients at once ->
    (latencies of the successes, errors, wall seconds)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(clients) + 1)
    deadline = [0.0]

    def user(k: int, client) -> None:
        start.wait()
        for r in range(rounds):
            left = deadline[0] - time.monotonic()
            if left <= 0:
                with lock:
                    errors.append("level time limit reached")
                continue
            path = str(images[(k * rounds + r) % len(images)])
            t0 = time.perf_counter()
            try:
                problem = caption_once(client, calls, path, left)
            except Exception as e:  # a load test reports every failure and goes on
                problem = f"{type(e).__name__}: {e}"
            with lock:
                if problem is None:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(problem)

    threads = [threading.Thread(target=user, args=(k, c), daemon=True) for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + timeout
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join(max(0.0, deadline[0] - time.monotonic()) + 5)
    return latencies, errors, time.perf_counter() - t0


def synthetic_images(folder: Path, count: int = 16) -> list[Path]:
    from captioning.data.synthetic import SyntheticShapes

    return SyntheticShapes("test", count, seed=0, image_size=224).write_images(folder, count)


def main(args: argparse.Namespace) -> None:
    from gradio_client import Client

    asked = sum(args.concurrency) * args.rounds * args.passes
    if asked > MAX_REQUESTS:
        raise SystemExit(f"error: {asked} requests asked for; at most {MAX_REQUESTS}")
    with tempfile.TemporaryDirectory(prefix="load_test_demo_") as tmp:
        if args.images:
            images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.images}")
        else:
            images = synthetic_images(Path(tmp) / "images")
        proc = None
        if args.start:
            if not args.checkpoint:
                raise SystemExit("error: --start needs --checkpoint PATH (the model the demo serves)")
            proc, url = start_demo(args.checkpoint, args.forget_after, Path(tmp) / "demo.log")
        else:
            url = args.url
            if urlparse(url).hostname not in LOCAL_HOSTS:
                raise SystemExit(f"error: {url} is not on this machine; the load test only talks to localhost")
        try:
            wait_until_up(url, proc)
            report(Client, url, proc, images, args)
        finally:
            if proc is not None:
                stop(proc)
                if proc.returncode not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
                    print(f"demo exited with code {proc.returncode}; its log:\n"
                          f"{(Path(tmp) / 'demo.log').read_text(errors='replace')[-2000:]}")


def report(client_class, url: str, proc: subprocess.Popen | None, images: list[Path], args: argparse.Namespace
           ) -> None:
    def memory() -> str:
        value = rss_mib(proc.pid) if proc is not None else None
        return f"{value:.0f} MiB" if value is not None else "n/a"

    probe = client_class(url, verbose=False, download_files=False, analytics_enabled=False)
    calls = find_calls(probe.view_api(print_info=False, return_format="dict"), args.beam_size, args.max_len,
                       args.api_name)
    base = memory()
    problem = caption_once(probe, calls, str(images[0]), args.level_timeout)  # warm-up, not counted
    if problem is not None:
        raise SystemExit(f"error: the warm-up request failed: {problem}")
    warm = memory()  # the first request loads code and kernels for good: the base that bursts should return to
    print(f"demo {url}  calls {calls.description}  {len(images)} images  beam {args.beam_size}  "
          f"max_len {args.max_len}  server RSS at start {base}, after warm-up {warm}")
    print(f"{'users':>5} {'requests':>8} {'errors':>6} {'p50 s':>7} {'p95 s':>7} {'req/s':>7}  server RSS")
    total, failed = 0, 0
    peak = [0.0]
    sampling = threading.Event()

    def sample_memory() -> None:  # the highest resident memory while the levels run
        while not sampling.wait(0.2):
            peak[0] = max(peak[0], rss_mib(proc.pid) or 0.0)

    if proc is not None:
        threading.Thread(target=sample_memory, daemon=True).start()
    after_pass = []
    for k in range(args.passes):
        for n in args.concurrency:
            clients = [client_class(url, verbose=False, download_files=False, analytics_enabled=False)
                       for _ in range(n)]
            latencies, errors, wall = run_level(clients, calls, images, args.rounds, args.level_timeout)
            for c in clients:
                c.close()
            total, failed = total + n * args.rounds, failed + len(errors)
            p50, p95 = np.percentile(latencies, [50, 95]) if latencies else (float("nan"), float("nan"))
            rate = len(latencies) / wall
            print(f"{n:>5} {n * args.rounds:>8} {len(errors):>6} {p50:>7.2f} {p95:>7.2f} {rate:>7.2f}  {memory()}",
                  flush=True)
            for message in sorted(set(errors))[:3]:
                print(f"      error: {message}")
        after_pass.append(memory())
        if args.passes > 1:
            print(f"pass {k + 1}/{args.passes} done, server RSS {after_pass[-1]}")
    sampling.set()
    probe.close()
    idle = args.settle + (2 * args.forget_after if proc is not None else 0)
    time.sleep(idle)
    memory_note = (f"; server RSS {base} at start, {warm} after warm-up, {peak[0]:.0f} MiB at most, "
                   f"{' / '.join(after_pass)} after each pass, {memory()} {idle:.0f} s after the last"
                   if proc is not None else
                   " (server memory is measured only with --start)")
    print(f"summary: {total} requests at {'/'.join(map(str, args.concurrency))} users x {args.passes} passes, "
          f"{failed} errors{memory_note}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
