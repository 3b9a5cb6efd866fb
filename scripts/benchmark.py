"""Speed and memory figures: each area prints a ratio of two things measured in the same run, with the absolute
numbers beside it, and the run ends with a one-line summary to paste into an issue. Beam, train and folder time the
two sides of their ratio in three alternating rounds and report the median round.

    python scripts/benchmark.py                        # every area (CUDA-only figures are skipped on a CPU)
    python scripts/benchmark.py beam latency --quick   # small sizes, for a quick check
    python scripts/benchmark.py beam --profile         # also the top operators of torch.profiler
    python scripts/benchmark.py train --device cuda --threads 4

Areas:
  beam     batched beam search (beam 5, 64 images, attention decoder 512, vocabulary 5,000, 7x7x2048 grids) vs the
           same function called one image at a time; the captions must be identical       (target >= 8x)
  train    training captions/s from cached features vs a frozen ResNet-50 at 224 in the loop, at 1 and at 5 captions
           per image, with malloc keeping freed memory as train() has it (process-wide, so this
           area runs after the others); with --bf16 also the cached steps in fp32 against bf16   (target >= 10x)
  folder   folder captioning (JPEG files, ResNet-50, beam 3, captioning.batch) vs the bare encoder on preloaded
           tensors at the same batch size                                                   (target >= 0.70)
  memory   peak RSS of folder captioning (scripts/caption.py) over 1,000 vs 10,000 images, each in a fresh process
           (ResNet-18 at 64 px, a small decoder)                                            (target within 10%)
  latency  one photo through ImageCaptioner.caption (the demo's path; ResNet-50, beam 3): p50 and p95 over 50
           photos after 3 warm-ups                                                           (target p50 <= 250 ms)
  gpu      CUDA only: training fp32 vs mixed precision (cached features; frozen ResNet-101 in the loop), the
           ResNet-101 forward NCHW vs channels_last, folder captioning with ResNet-101, peak GPU memory

Weights are random (weights=None): speed does not depend on their values, but a random decoder rarely says <end>,
so its captions run to max_len words; the mean caption length is printed, and decoding times are an upper bound.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from captioning.batch import caption_files, expand_inputs, open_writer
from captioning.checkpoint import save_checkpoint
from captioning.config import Config, ConfigError, at_least, load_config
from captioning.decoding import beam_search
from captioning.engine import (
    StepState,
    autocast,
    check_cpu_bf16,
    grad_scaler,
    keep_freed_memory,
    resolve_device,
    train_one_epoch,
)
from captioning.inference import ImageCaptioner
from captioning.models import Captioner
from captioning.models.decoder import build_decoder
from captioning.training import build_optimizer
from captioning.vocab import END_ID, PAD_ID, SPECIALS, START_ID, Vocabulary

AREAS = ("beam", "train", "folder", "memory", "latency", "gpu")
SCRIPTS = Path(__file__).resolve().parent
COCO_LIKE = {"model.embed_dim": 512, "model.hidden_dim": 512, "model.attention_dim": 512}
VOCAB_SIZE = 5000


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("areas", nargs="*", default=list(AREAS), metavar="AREA",
                   help=f"what to measure: {', '.join(AREAS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes: a check that every area runs, not figures")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--threads", type=at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators for beam and latency")
    p.add_argument("--compile", action="store_true", help="gpu: also time training with train.compile=true")
    p.add_argument("--bf16", action="store_true", help="CPU: every area in bfloat16, as caption.py --bf16 runs "
                                                       "(needs bf16 matrix units, e.g. Intel AMX)")
    p.add_argument("--memory-child", nargs=3, metavar=("CHECKPOINT", "LIST", "OUT"), help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """(fn's result, wall seconds), with the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def paired(a: Callable[[], object], b: Callable[[], object], device: torch.device, rounds: int = 3
           ) -> tuple[tuple[object, object, float, float], list[float]]:
    """Runs a then b, `rounds` times -> (a's result, b's result, a's seconds, b's seconds) of the round whose ratio of
    b's time to a's is the median, and every round's ratio, lowest first. The two sides of each ratio are timed next
    to each other, so that a change in the machine's speed during the run (other tenants of a VM) lands on both
    sides instead of on one."""
    runs = []
    for _ in range(rounds):
        (result_a, seconds_a), (result_b, seconds_b) = timed(a, device), timed(b, device)
        runs.append((result_a, result_b, seconds_a, seconds_b))
    runs.sort(key=lambda r: r[3] / r[2])
    return runs[len(runs) // 2], [r[3] / r[2] for r in runs]


def model_config(encoder: str = "resnet50", image_size: int = 224, **overrides) -> Config:
    """A COCO-sized attention captioner (random weights) with `encoder` at `image_size`."""
    settings = {"model.encoder": encoder, "model.encoder_weights": None, "data.image_size": image_size, **COCO_LIKE,
                **overrides}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()])


def vocabulary(size: int) -> Vocabulary:
    return Vocabulary([*SPECIALS, *(f"w{i}" for i in range(size - len(SPECIALS)))])


def write_checkpoint(path: Path, cfg: Config, vocab_size: int = VOCAB_SIZE) -> Path:
    """A checkpoint load_model accepts (config, vocabulary, weights) for a randomly initialised model."""
    vocab = vocabulary(vocab_size)
    model = Captioner(cfg.model, vocab)
    save_checkpoint({"config": cfg.to_dict(), "vocab": vocab.to_dict(), "model": model.state_dict()}, path)
    return path


def photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB image (width, height): smooth colour regions plus sensor noise, so JPEG sizes and decoding
    times are those of real photos rather than of flat drawings."""
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (h, w, 3)).astype(np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_photos(folder: Path, count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i:06d}.jpg" for i in range(count)]
    for path in paths:
        photo(rng, size).save(path, quality=90)
    return paths


def random_captions(n_images: int, per_image: int, vocab_size: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """COCO-like training captions: <start> 8..16 words <end>, padded -> captions (R, T), image_index (R,)."""
    rows = []
    for _ in range(n_images * per_image):
        n = int(torch.randint(8, 17, (1,), generator=generator))
        words = torch.randint(len(SPECIALS), vocab_size, (n,), generator=generator)
        rows.append(torch.cat([torch.tensor([START_ID]), words, torch.tensor([END_ID])]))
    captions = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD_ID)
    return captions, torch.arange(n_images).repeat_interleave(per_image)


def grid_features(n: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """(n, 49, 2048) non-negative features, as a ResNet's last stage (after ReLU) gives them."""
    return torch.randn(n, 49, 2048, generator=generator).relu().to(device)


def flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of the matrix products and convolutions that fn runs (torch's FLOP counter)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(device: torch.device, n: int = 2048) -> float:
    """GFLOP/s of one large fp32 matrix product: what this device's arithmetic can do at best."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(5)], device)
    return 5 * 2 * n**3 / seconds / 1e9


def profile(label: str, fn: Callable[[], object], device: torch.device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n  profile: {label}")
    print(prof.key_averages().table(sort_by=sort, row_limit=12))


def line(name: str, value: str) -> None:
    print(f"  {name:<24}: {value}")


# ---------------------------------------------------------------------------------------------------- areas


def bench_beam(args, device: torch.device, work: Path) -> dict:
    n_images, beam = (8 if args.quick else 64), 5
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    decoder = build_decoder(model_config().model, VOCAB_SIZE, 2048).to(device).eval()
    grid = grid_features(n_images, device, g)  # (B, 49, 2048)
    pooled = grid.mean(1)  # (B, 2048)
    print(f"beam: beam {beam}, {n_images} images, attention decoder 512, vocabulary {VOCAB_SIZE}, 7x7x2048 grids")
    # Warm-up at both measured shapes: the first call at a new size pays for the allocator's first touch of its
    # buffers (a 64-image batch's attention activations are 32 MB a step) and for new oneDNN primitives or kernels.
    beam_search(decoder, grid, pooled, beam)
    beam_search(decoder, grid[:1], pooled[:1], beam)
    (batched, single, t_batched, t_single), ratios = paired(
        lambda: beam_search(decoder, grid, pooled, beam),
        lambda: [beam_search(decoder, grid[i:i + 1], pooled[i:i + 1], beam)[0] for i in range(n_images)], device)
    same = [a[0].tokens == b[0].tokens for a, b in zip(batched, single)]
    gap = max((abs(a[0].score - b[0].score) for a, b in zip(batched, single)), default=0.0)
    speedup = t_single / t_batched
    work = flops(lambda: beam_search(decoder, grid, pooled, beam)) / 1e9  # the same for both: same captions
    line("batched", f"{n_images / t_batched:8.2f} images/s ({t_batched:.2f} s, {work / t_batched:.0f} GFLOP/s)")
    line("one image at a time",
         f"{n_images / t_single:8.2f} images/s ({t_single:.2f} s, {work / t_single:.0f} GFLOP/s)")
    line("speed-up", f"{speedup:.1f}x (target >= 8x), the median of three rounds ({ratios[0]:.1f}-{ratios[-1]:.1f}x)")
    precision = "bf16" if args.bf16 else "fp32"
    line("arithmetic", f"{work:.0f} GFLOP of matrix products; a large {precision} matmul here runs at "
                       f"{matmul_gflops(device):.0f} GFLOP/s, which bounds the batched rate")
    line("captions identical", f"{sum(same)}/{n_images}{'' if all(same) else '  <-- MISMATCH'} (largest score gap "
                               f"{gap:.1e}), mean length {np.mean([len(h[0].tokens) for h in batched]):.1f} words")
    if args.profile:
        profile(f"batched beam search, {n_images} images", lambda: beam_search(decoder, grid, pooled, beam), device)
        profile("beam search on one image", lambda: beam_search(decoder, grid[:1], pooled[:1], beam), device)
    return {"summary": f"beam {speedup:.1f}x", "ok": all(same)}


def training_steps(model: Captioner, batch: dict, cfg: Config, device: torch.device) -> Callable[[int], None]:
    """A function that runs n steps of train_one_epoch (forward, caption_loss, backward, clipping, Adam) on `batch`."""
    optimizer = build_optimizer(model, cfg)
    scaler = grad_scaler(device, cfg.train.amp)

    def run(n: int) -> None:
        with contextlib.redirect_stderr(io.StringIO()):  # the loop's progress bar would break up the figures
            train_one_epoch(model, [batch] * n, optimizer, None, scaler, device, cfg.train, StepState(), n)

    return run


def train_rate(model: Captioner, batch: dict, cfg: Config, device: torch.device, steps: int) -> float:
    """Captions/s of `steps` training steps on `batch`, after one warm-up step."""
    run = training_steps(model, batch, cfg, device)
    run(1)
    _, seconds = timed(lambda: run(steps), device)
    return steps * batch["captions"].size(0) / seconds


def training_batches(n_images: int, per_image: int, device: torch.device, image_size: int = 224
                     ) -> tuple[dict, dict]:
    """The same captions with cached features (B, 49, 2048) and with images (B, 3, 224, 224)."""
    g = torch.Generator().manual_seed(0)
    captions, image_index = random_captions(n_images, per_image, VOCAB_SIZE, g)
    common = {"captions": captions.to(device), "image_index": image_index.to(device), "skipped": []}
    features = {"inputs": grid_features(n_images, device, g), **common}
    images = {"inputs": torch.randn(n_images, 3, image_size, image_size, generator=g).to(device), **common}
    return features, images


def bench_train(args, device: torch.device, work: Path) -> dict:
    """Both ways a batch can hold its captions: one caption per image (data.captions_per_image=1, the default, and
    how most captioning code trains: every caption pays for an encoder forward) and five per image (the Flickr8k
    configs: the encoder runs once for five captions, so the cache has less left to save)."""
    n_images, steps = (4, 1) if args.quick else (32, 2)
    if device.type == "cpu":
        keep_freed_memory()
    cfg = model_config("resnet50")
    cfg.train.amp = False
    torch.manual_seed(0)
    model = Captioner(cfg.model, vocabulary(VOCAB_SIZE)).to(device)
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"train: {n_images} images per step, attention decoder 512, vocabulary {VOCAB_SIZE}, Adam, {precision}")
    summary = []
    for per_image in (1, 5):
        features, images = training_batches(n_images, per_image, device)
        from_cache, with_encoder = (training_steps(model, batch, cfg, device) for batch in (features, images))
        from_cache(1), with_encoder(1)  # warm-up
        (_, _, t_cached, t_in_loop), ratios = paired(partial(from_cache, steps), partial(with_encoder, steps), device)
        cached, in_loop = (steps * n_images * per_image / t for t in (t_cached, t_in_loop))
        ratio = cached / in_loop
        gflop = {name: flops(partial(run, 1)) / 1e9
                for name, run in (("cached", from_cache), ("in the loop", with_encoder))}
        print(f"  {per_image} caption{'s' if per_image > 1 else ''} per image ({n_images * per_image} per step)")
        line("cached features", f"{cached:8.1f} captions/s ({gflop['cached']:.0f} GFLOP per step)")
        line("ResNet-50 in the loop", f"{in_loop:8.1f} captions/s ({gflop['in the loop']:.0f} GFLOP per step)")
        line("ratio", f"{ratio:.1f}x (target >= 10x), the median of three rounds ({ratios[0]:.1f}-"
                      f"{ratios[-1]:.1f}x); the FLOP ratio of the two steps is "
                      f"{gflop['in the loop'] / gflop['cached']:.1f}x")
        summary.append(f"train {ratio:.1f}x ({per_image}/image)")
        if args.bf16:  # what train.cpu_bf16 buys: the same cached steps with the outer bf16 autocast switched off
            fp32 = partial(torch.autocast("cpu", enabled=False)(from_cache), steps)
            (_, _, t_fp32, t_bf16), bf16_ratios = paired(fp32, partial(from_cache, steps), device)
            line("cached features in fp32", f"{steps * n_images * per_image / t_fp32:8.1f} captions/s; bf16 "
                                            f"{t_fp32 / t_bf16:.2f}x as fast (train.cpu_bf16), rounds "
                                            f"{1 / bf16_ratios[-1]:.2f}-{1 / bf16_ratios[0]:.2f}x")
            summary.append(f"train.cpu_bf16 {t_fp32 / t_bf16:.2f}x ({per_image}/image)")
    return {"summary": ", ".join(summary), "ok": True}


def encoder_pass(model: Captioner, image_size: int, n_images: int, batch_size: int, amp: bool = True
                 ) -> Callable[[], int]:
    """A function that runs the encoder alone over n_images preloaded images (whole batches, at least one) as
    caption_batch runs it (no_grad, autocast) -> how many it encoded."""
    device = next(model.parameters()).device
    batch = torch.randn(batch_size, 3, image_size, image_size).to(device)
    batches = max(1, n_images // batch_size)

    @torch.no_grad()
    def run() -> int:
        for _ in range(batches):
            with autocast(device, amp):
                model.encode(batch)
        return batches * batch_size

    return run


def encoder_rate(model: Captioner, image_size: int, n_images: int, batch_size: int, amp: bool = True) -> float:
    """Images/s of encoder_pass, after one warm-up pass."""
    run = encoder_pass(model, image_size, n_images, batch_size, amp)
    run()
    count, seconds = timed(run, next(model.parameters()).device)
    return count / seconds


def folder_pass(captioner: ImageCaptioner, paths: list[str], out: Path, beam_size: int, batch_size: int,
                num_workers: int) -> Callable[[], int]:
    """A function that captions `paths` afresh into `out` with captioning.batch.caption_files -> how many it
    captioned. One batch is captioned first, as a warm-up."""
    with open_writer(out.with_suffix(".warmup.jsonl"), "jsonl", overwrite=True) as writer:
        caption_files(captioner, paths[:batch_size], writer, beam_size, batch_size=batch_size, num_workers=0,
                      progress=False)

    def run() -> int:
        with open_writer(out, "jsonl", overwrite=True) as writer:
            summary = caption_files(captioner, paths, writer, beam_size, batch_size=batch_size,
                                    num_workers=num_workers, progress=False)
        if summary.done != len(paths):
            raise RuntimeError(f"captioned {summary.done} of {len(paths)} images")
        return summary.done

    return run


def mean_words(out: Path) -> float:
    """Mean caption length in a JSON Lines results file."""
    return float(np.mean([len(json.loads(r)["caption"].split()) for r in out.read_text().splitlines()]))


def bench_folder(args, device: torch.device, work: Path) -> dict:
    n_images, batch_size, beam, workers = (16 if args.quick else 64), 16, 3, 2  # caption.py's defaults
    checkpoint = write_checkpoint(work / "resnet50.pt", model_config("resnet50"))
    captioner = ImageCaptioner.from_checkpoint(checkpoint, str(device))
    paths = list(expand_inputs([write_photos(work / "photos", n_images)[0].parent]))
    print(f"folder: {n_images} JPEG photos 640x480, ResNet-50 at 224, beam {beam}, batch {batch_size}, "
          f"{workers} loader workers")
    end_to_end = folder_pass(captioner, paths, work / "folder.jsonl", beam, batch_size, workers)
    bare = encoder_pass(captioner.model, captioner.preprocess.size, n_images, batch_size)
    bare()  # warm-up
    (encoded, captioned, t_bare, t_folder), ratios = paired(bare, end_to_end, device)
    per_image = captioned / encoded  # a round's ratio of images/s is this over its ratio of seconds
    ratio = per_image * t_bare / t_folder
    line("folder captioning", f"{captioned / t_folder:8.2f} images/s (mean caption "
                              f"{mean_words(work / 'folder.jsonl'):.1f} words)")
    line("encoder alone", f"{encoded / t_bare:8.2f} images/s")
    line("ratio", f"{ratio:.2f} (target >= 0.70), the median of three rounds "
                  f"({per_image / ratios[-1]:.2f}-{per_image / ratios[0]:.2f})")
    return {"summary": f"folder {ratio:.2f}", "ok": True}


def memory_child(args) -> None:
    """Caption the images of a list file with scripts/caption.py in this fresh process; print peak RSS as JSON."""
    spec = importlib.util.spec_from_file_location("caption_script", SCRIPTS / "caption.py")
    caption_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(caption_script)
    checkpoint, list_file, out = args.memory_child
    start = time.perf_counter()
    caption_script.main(caption_script.get_args_parser().parse_args(
        ["--checkpoint", checkpoint, list_file, "--out", out, "--overwrite", "--device", args.device,
         *(["--bf16"] if args.bf16 else [])]))
    print(json.dumps({"main_kib": own_peak_rss_kib(),
                      "worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                      "seconds": time.perf_counter() - start}))


def own_peak_rss_kib() -> int:
    """This process's peak resident memory in KiB. Linux's VmHWM belongs to the address space made by exec, whereas
    getrusage's ru_maxrss keeps the high-water mark of the process that forked us (here: the whole benchmark)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(row.split()[1]) for row in f if row.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss(checkpoint: Path, list_file: Path, out: Path, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(checkpoint), str(list_file),
               str(out), "--device", args.device, "--threads", str(args.threads), *(["--bf16"] if args.bf16 else [])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"folder captioning of {list_file} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_memory(args, device: torch.device, work: Path) -> dict:
    small, large = (200, 2000) if args.quick else (1000, 10000)
    cfg = model_config("resnet18", 64, **{"model.embed_dim": 64, "model.hidden_dim": 128, "model.attention_dim": 64})
    checkpoint = write_checkpoint(work / "resnet18.pt", cfg, vocab_size=1000)
    paths = write_photos(work / "small_photos", large, size=(96, 72))
    print(f"memory: scripts/caption.py in a fresh process per run, {small} vs {large} JPEGs 96x72, ResNet-18 at 64 px,"
          " beam 3, batch 16, 2 loader workers")
    peaks = {}
    for n in (small, large):
        list_file = work / f"first_{n}.txt"
        list_file.write_text("".join(f"{p}\n" for p in paths[:n]))
        peaks[n] = peak_rss(checkpoint, list_file, work / f"memory_{n}.jsonl", args)
        line(f"{n} images", f"main process {peaks[n]['main_kib'] / 1024:7.1f} MiB, largest worker "
                            f"{peaks[n]['worker_kib'] / 1024:6.1f} MiB ({n / peaks[n]['seconds']:.0f} images/s)")
    ratio = peaks[large]["main_kib"] / peaks[small]["main_kib"]
    worker_ratio = peaks[large]["worker_kib"] / peaks[small]["worker_kib"]
    line("ratio", f"{ratio:.3f} main process, {worker_ratio:.3f} worker (target within 10%: <= 1.10)")
    return {"summary": f"memory {ratio:.2f}", "ok": True}


def bench_latency(args, device: torch.device, work: Path) -> dict:
    warmups, n_photos, beam = 3, (10 if args.quick else 50), 3
    checkpoint = work / "resnet50.pt"
    if not checkpoint.exists():
        write_checkpoint(checkpoint, model_config("resnet50"))
    captioner = ImageCaptioner.from_checkpoint(checkpoint, str(device))
    rng = np.random.default_rng(1)
    photos = [photo(rng, (640, 480)) for _ in range(warmups + n_photos)]
    print(f"latency: one 640x480 photo per call through ImageCaptioner.caption, ResNet-50 at 224, beam {beam}; "
          f"{n_photos} photos after {warmups} warm-ups")
    total, encoder = [], []
    for i, image in enumerate(photos):
        _, seconds = timed(lambda im=image: captioner.caption([im], beam_size=beam), device)
        x = captioner.preprocess(image).unsqueeze(0).to(device)
        with torch.no_grad(), autocast(device):
            _, encode_seconds = timed(lambda x=x: captioner.model.encode(x), device)
        if i >= warmups:
            total.append(seconds * 1000)
            encoder.append(encode_seconds * 1000)
    p50, p95 = np.percentile(total, 50), np.percentile(total, 95)
    line("caption one photo", f"p50 {p50:6.1f} ms, p95 {p95:6.1f} ms (target p50 <= 250 ms)")
    line("encoder alone", f"p50 {np.percentile(encoder, 50):6.1f} ms")
    line("ratio", f"p50 / target {p50 / 250:.2f}; encoder share of p50 {np.percentile(encoder, 50) / p50:.2f}; "
                  f"p95 / p50 {p95 / p50:.2f}")
    if args.profile:
        profile("ImageCaptioner.caption on one photo", lambda: captioner.caption([photos[0]], beam_size=beam), device)
    return {"summary": f"latency p50 {p50:.0f} ms", "ok": True}


def gpu_training(batch: dict, amp: bool, steps: int, device: torch.device, compile_step: bool = False
                 ) -> tuple[float, int, Callable[[int], None]]:
    """(captions/s, peak GPU bytes of the model, its optimizer and its steps, the step function) of training a
    ResNet-101 captioner on `batch` in fp32 or mixed precision."""
    base = torch.cuda.memory_allocated(device)  # what earlier runs still hold (their models and batches)
    torch.cuda.reset_peak_memory_stats(device)
    cfg = model_config("resnet101")
    cfg.train.amp = amp
    torch.manual_seed(0)
    model = Captioner(cfg.model, vocabulary(VOCAB_SIZE)).to(device)
    if compile_step:
        model.decoder.compile_step()
    rate = train_rate(model, batch, cfg, device, steps)
    return rate, torch.cuda.max_memory_allocated(device) - base, training_steps(model, batch, cfg, device)


def gpu_busy_ms(run: Callable[[int], None], device: torch.device, steps: int = 3) -> float:
    """The kernels' own time per step (torch.profiler): when it is far below the wall time of a step, the step
    waits on the host launching kernels, not on the GPU's arithmetic. Measured after every timing, as profiling
    slows down the kernel launches that follow it."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(steps)
        sync(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / steps


def bench_gpu(args, device: torch.device, work: Path) -> dict:
    if device.type != "cuda":
        print("gpu: skipped (needs CUDA; this run is on the CPU)")
        return {"summary": "gpu skipped", "ok": True}
    per_image, steps = 5, (2 if args.quick else 20)
    sizes = (16,) if args.quick else (64, 512)  # configs/coco_attention.yaml's batch, and a batch that fills the GPU
    mixed = "bf16" if torch.cuda.is_bf16_supported() else "fp16 + GradScaler"
    print(f"gpu: {torch.cuda.get_device_name(device)}; training steps of B images x {per_image} captions, attention "
          f"decoder 512, vocabulary {VOCAB_SIZE}, Adam; mixed = {mixed}; fp32 = PyTorch's defaults (TF32 "
          "convolutions, full fp32 matrix products)")
    peaks, summary, steppers = {}, [], {}
    for n_images in sizes:
        features, images = training_batches(n_images, per_image, device)
        runs = [(f"cached features, B={n_images}", features)]
        if n_images == sizes[0]:
            runs.append((f"ResNet-101 in the loop, B={n_images}", images))
        for name, batch in runs:
            rates = {}
            for amp in (False, True):
                label = f"{name} {'mixed' if amp else 'fp32'}"
                rates[amp], peaks[label], run = gpu_training(batch, amp, steps, device)
                steppers[label] = (run, 1e3 * batch["captions"].size(0) / rates[amp])
                line(label, f"{rates[amp]:8.0f} captions/s")
            line("ratio", f"{rates[True] / rates[False]:.2f}x mixed / fp32 (target >= 1.8x)")
            summary.append(f"amp {rates[True] / rates[False]:.2f}x ({name})")
        if args.compile and n_images == sizes[0]:
            rate, peaks["compiled step, mixed"], _ = gpu_training(features, True, steps, device, True)
            line("compiled step, mixed", f"{rate:8.0f} captions/s from cached features (train.compile=true)")

    cfg = model_config("resnet101")
    torch.manual_seed(0)
    model = Captioner(cfg.model, vocabulary(VOCAB_SIZE)).to(device).eval()
    batch_size = 64
    for channels_last in (False, True):
        model.encoder.channels_last = channels_last
        rates = [encoder_rate(model, 224, 8 * batch_size, batch_size, amp) for amp in (False, True)]
        line(f"ResNet-101 {'NHWC' if channels_last else 'NCHW'}", f"fp32 {rates[0]:7.0f}, mixed {rates[1]:7.0f} "
                                                               f"images/s (encoder forward, batch {batch_size})")
    del model

    n_files = 64 if args.quick else 2048
    workers = min(12, os.cpu_count() or 1)
    checkpoint = write_checkpoint(work / "resnet101.pt", cfg)
    base = torch.cuda.memory_allocated(device)
    captioner = ImageCaptioner.from_checkpoint(checkpoint, str(device))
    paths = list(expand_inputs([write_photos(work / "gpu_photos", n_files)[0].parent]))
    run = folder_pass(captioner, paths, work / "gpu_folder.jsonl", 3, batch_size, workers)
    torch.cuda.reset_peak_memory_stats(device)
    count, seconds = timed(run, device)
    end_to_end = count / seconds
    peaks["folder captioning"] = torch.cuda.max_memory_allocated(device) - base
    bare = encoder_rate(captioner.model, captioner.preprocess.size, n_files, batch_size)
    line("folder, ResNet-101", f"{end_to_end:8.0f} images/s ({n_files} JPEGs 640x480, beam 3, batch {batch_size}, "
                               f"{workers} loader workers, mean caption {mean_words(work / 'gpu_folder.jsonl'):.1f} "
                               "words)")
    line("encoder alone", f"{bare:8.0f} images/s (mixed, NHWC, preloaded tensors)")
    line("ratio", f"{end_to_end / bare:.2f} folder / encoder")
    line("peak GPU memory", ", ".join(f"{name} {peak / 2**20:.0f} MiB" for name, peak in peaks.items()))
    for label, (run, wall_ms) in steppers.items():
        line(f"GPU busy, {label}", f"{gpu_busy_ms(run, device):5.1f} of {wall_ms:5.1f} ms per step")
    summary.append(f"folder r101 {end_to_end:.0f} img/s")
    return {"summary": "gpu " + ", ".join(summary), "ok": True}


BENCHMARKS = {"beam": bench_beam, "train": bench_train, "folder": bench_folder, "memory": bench_memory,
              "latency": bench_latency, "gpu": bench_gpu}


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [a for a in args.areas if a not in AREAS]
    if unknown:
        sys.exit(f"error: unknown area {unknown}; choose from {', '.join(AREAS)}")
    try:
        device = resolve_device(args.device)
        if args.bf16:
            check_cpu_bf16(device)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.memory_child:
        memory_child(args)
        return 0
    load = "n/a" if not hasattr(os, "getloadavg") else f"{os.getloadavg()[0]:.1f}"
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs, "
          f"load average {load}{', quick sizes' if args.quick else ''}{', bf16' if args.bf16 else ''}")
    results = []
    with tempfile.TemporaryDirectory(prefix="captioning-benchmark-") as tmp:
        for area in sorted(dict.fromkeys(args.areas), key=lambda a: a == "train"):  # as given, each once, train last
            print()
            # --bf16 (CPUs only) holds for the whole area; on CUDA each area sets its own precision
            with autocast(device, enabled=args.bf16, cpu_bf16=args.bf16):
                results.append(BENCHMARKS[area](args, device, Path(tmp)))
    print(f"\nsummary ({device}, {torch.get_num_threads()} threads{', quick' if args.quick else ''}"
          f"{', bf16' if args.bf16 else ''}): "
          + ", ".join(r["summary"] for r in results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
