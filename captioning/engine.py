"""One training epoch and one evaluation pass; everything they use arrives as an argument."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from captioning.config import ConfigError, TrainConfig
from captioning.data.datasets import report_unreadable, seed_of
from captioning.decoding import decode
from captioning.distributed import gather_objects, global_rank, is_main, local_rank, max_over_ranks
from captioning.metrics import score_captions
from captioning.models import Captioner
from captioning.rewards import SampleRewards
from captioning.vocab import PAD_ID


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> the local CUDA device (torchrun's LOCAL_RANK) if there is one, else CPU. A device this machine does
    not have is a ConfigError."""
    if name == "auto":
        name = f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}, but PyTorch sees {torch.cuda.device_count()} CUDA GPUs here: use auto or "
                          "cpu (a CPU-only PyTorch build sees none)")
    if device.type not in ("cpu", "cuda"):
        try:  # mps, xpu, ...: each backend says it is missing in its own way, some in a page of text
            torch.empty(0, device=device)
        except Exception:
            raise ConfigError(f"device {name!r} is not usable here (this PyTorch build or machine has no "
                              f"{device.type} backend): use auto or cpu") from None
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current device, named by its index as set_device needs
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def console_logging(level: int) -> Iterator[None]:
    """A script's log lines: the message alone, from `level` up, written above the progress bar instead of into it."""
    logging.basicConfig(level=level, format="%(message)s")
    with logging_redirect_tqdm():
        yield


class StopFlag:
    """While in effect, SIGTERM and Ctrl-C set `signal` for a loop to stop at its next safe point, instead of raising
    KeyboardInterrupt wherever the program is (or in a finaliser, which would swallow it); a second one stops at once.
    DataLoader workers leave both signals to the main process (leave_signals_to_main). Off the main thread, where
    Python allows no handler, it does nothing."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Stopped(Exception):
    """A loop run under StopFlag stopped at its safe point; what it had finished is kept."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def leave_signals_to_main(worker_id: int) -> None:
    """DataLoader worker_init_fn: a worker ignores SIGTERM and Ctrl-C, which the main process handles (StopFlag) and
    then shuts its workers down. A signal sent to the whole process group (Ctrl-C in a terminal, `timeout`, SLURM's
    scancel) would otherwise kill the workers, and the main process's next batch fail with "DataLoader worker killed"
    before it reached its stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None) if sys.platform == "linux" else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # musl has no malloc_trim


GLIBC = _glibc()  # the C library's malloc settings, where it is glibc (None elsewhere)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory that tensors free for the next ones, instead of handing it back to the
    system -> whether it could (False off glibc). A training step on the CPU allocates and frees the same large
    activations every time; above malloc's mmap threshold (32 MiB at most) each one is mapped afresh and every page
    faults in again, which was a fifth of a decoder training step on a 2-core VM. The process then keeps its peak
    memory until it exits."""
    if GLIBC is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from malloc.h
    return bool(GLIBC.mallopt(M_MMAP_MAX, 0)) and bool(GLIBC.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def autocast(device: torch.device, enabled: bool = True, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 where supported, else fp16); on a CPU bf16 only when asked (`cpu_bf16`, see
    check_cpu_bf16), as it pays only where the CPU has bf16 matrix units and moves some captions by a word."""
    if not enabled or device.type not in ("cuda", "cpu") or (device.type == "cpu" and not cpu_bf16):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """The loss scaler that goes with autocast(device, enabled): it scales only fp16 on a GPU without bf16, and
    passes the loss through everywhere else."""
    fp16 = device.type == "cuda" and enabled and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=fp16)


def has_cpu_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (Intel AMX, AVX512-BF16)."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def check_cpu_bf16(device: torch.device, option: str = "--bf16") -> None:
    """A ConfigError, naming `option`, unless `device` is a CPU with bf16 matrix units (Intel AMX, AVX512-BF16), where
    bf16 matrix products are 2-7x faster than fp32; elsewhere bf16 is emulated and slower, and a GPU runs mixed
    precision anyway."""
    if device.type != "cpu":
        raise ConfigError(f"{option} is for CPUs; on {device} the model already runs in mixed precision")
    if not has_cpu_bf16():
        raise ConfigError(f"{option}: this CPU has no bf16 matrix units (Intel AMX or AVX512-BF16), so bf16 would be "
                          f"slower than fp32 here; leave {option} out")


def caption_loss(logits: torch.Tensor, captions: torch.Tensor, alphas: torch.Tensor | None,
                 label_smoothing: float = 0.0, attention_penalty: float = 0.0) -> torch.Tensor:
    """Cross-entropy on captions[:, 1:] (padding ignored) + the doubly stochastic attention penalty
    lambda * mean_i (1 - sum_t alpha_ti)^2 of Show, Attend and Tell (only over real words)."""
    targets = captions[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD_ID,
                           label_smoothing=label_smoothing)
    if alphas is not None and attention_penalty > 0:
        mask = (targets != PAD_ID).unsqueeze(-1)  # (B, T-1, 1)
        coverage = (alphas.float() * mask).sum(1)  # (B, N)
        loss = loss + attention_penalty * ((1.0 - coverage) ** 2).mean()
    return loss


def self_critical_loss(tokens: torch.Tensor, token_logp: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Self-critical policy gradient with the mean of the other samples as baseline (Rennie et al. 2017; Luo 2020).
    tokens, token_logp (B*K, T) from K samples per image, rewards (B, K) -> loss: minus the advantage-weighted
    log-probability, averaged over the sampled words and <end> tokens."""
    K = rewards.size(1)
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (K - 1)  # (B, K)
    advantage = (rewards - baseline).reshape(-1, 1).to(token_logp.dtype)  # (B*K, 1)
    mask = tokens != PAD_ID  # (B*K, T): words and <end>
    return -(advantage * token_logp * mask).sum() / mask.sum()


@dataclass
class StepState:
    """Progress counters that a checkpoint must carry to resume mid-epoch."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    skipped_nonfinite: int = 0
    losses: list[float] = field(default_factory=list)  # per step: the loss (self-critical: the mean reward)


def _advance(progress: StepState, scheduler) -> None:
    """Count a step, so that a resumed run skips exactly the batches already seen."""
    if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step()
    progress.step_in_epoch += 1
    progress.global_step += 1


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, scaler,
                    device: torch.device, cfg: TrainConfig, progress: StepState, total_steps: int,
                    on_step: Callable[[], bool] | None = None, rewards: SampleRewards | None = None) -> float:
    """Train over `loader` (already positioned for a resume) -> mean loss, or with `rewards` (self-critical
    training) the mean reward of the sampled captions. `on_step` runs after every step and returns True to stop
    early (a signal arrived); it is where mid-epoch checkpoints are written."""
    model.train()
    bar = tqdm(loader, desc=f"epoch {progress.epoch + 1}", disable=not is_main(), leave=False, dynamic_ncols=True)
    for batch in bar:
        # A batch whose every image was unreadable is skipped, and the step still counts. Under torchrun every rank
        # skips it together: DDP's forward and backward are collectives that no rank may leave out.
        if max_over_ranks(int(not report_unreadable(batch)), device):
            _advance(progress, scheduler)
            if on_step is not None and on_step():
                break
            continue
        # The step's random numbers (dropout, scheduled sampling, self-critical samples) depend on (seed, rank, step)
        # alone, so a run resumed at any step draws what it would have drawn, on every rank of a torchrun job too
        torch.manual_seed(seed_of(cfg.seed, global_rank(), progress.global_step))
        inputs = batch["inputs"].to(device, non_blocking=True)
        captions = batch["captions"].to(device, non_blocking=True)
        image_index = batch["image_index"].to(device, non_blocking=True)
        sample_prob = cfg.scheduled_sampling * min(1.0, progress.global_step / max(1, total_steps))
        with autocast(device, cfg.amp, cfg.cpu_bf16):
            if rewards is None:
                logits, alphas = model(inputs, captions, image_index, sample_prob)
                loss = caption_loss(logits, captions, alphas, cfg.label_smoothing, cfg.attention_penalty)
            else:
                tokens, token_logp = model(inputs, None, samples=cfg.scst_samples, max_len=cfg.max_decode_len)
                sample_rewards = rewards(batch["index"], tokens)  # (B, K)
                loss = self_critical_loss(tokens, token_logp, sample_rewards)
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        tracked = loss_value if rewards is None else sample_rewards.mean().item()
        # Under torchrun every rank skips the step together: one that went on would wait in DDP's gradient
        # all-reduce for the rank that skipped it
        if max_over_ranks(int(not math.isfinite(loss_value)), device):
            progress.skipped_nonfinite += 1
            if progress.skipped_nonfinite > 10:
                raise FloatingPointError(f"the loss was not finite on more than 10 steps (last at step "
                                         f"{progress.global_step}); lower train.lr or turn off train.amp")
            if is_main():
                where = f"is {loss_value}" if not math.isfinite(loss_value) else "was not finite on another process"
                bar.write(f"step {progress.global_step}: loss {where}, step skipped")
        else:
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            progress.losses.append(tracked)
        _advance(progress, scheduler)
        bar.set_postfix({"loss" if rewards is None else "reward": f"{tracked:.3f}",
                         "lr": f"{optimizer.param_groups[0]['lr']:.2e}"})
        if on_step is not None and on_step():
            break
    return sum(progress.losses) / max(1, len(progress.losses))


@torch.no_grad()
def predict(model: Captioner, loader, device: torch.device, beam_size: int = 1, max_len: int = 20,
            length_penalty: float = 0.0, amp: bool = True,
            should_stop: Callable[[], bool] | None = None, no_repeat_ngram: int = 3,
            cpu_bf16: bool = False) -> dict[int, str]:
    """Decode every image of `loader` (items carry dataset indices) -> {index: caption}. Under torchrun each rank
    decodes its shard and the results are gathered on every rank. `should_stop` is asked before every batch; once it
    returns True (a signal arrived) decoding ends, with the captions of the images decoded so far."""
    model.eval()
    predictions: dict[int, str] = {}
    for batch in tqdm(loader, desc="decode", disable=not is_main(), leave=False, dynamic_ncols=True):
        if should_stop is not None and should_stop():
            break
        if not report_unreadable(batch):
            continue
        with autocast(device, amp, cpu_bf16):
            grid, pooled = model.encode(batch["inputs"].to(device, non_blocking=True))
            hyps = decode(model.decoder, grid, pooled, beam_size, max_len, length_penalty,
                          no_repeat_ngram=no_repeat_ngram)
        for i, h in zip(batch["index"].tolist(), hyps):
            predictions[i] = " ".join(model.vocab.decode(h[0].tokens))
    merged: dict[int, str] = {}
    for part in gather_objects(predictions):
        merged.update(part)
    return merged


def evaluate(model: Captioner, loader, references: list[list[str]], device: torch.device, beam_size: int = 1,
             max_len: int = 20, length_penalty: float = 0.0, amp: bool = True, meteor: bool = False,
             no_repeat_ngram: int = 3, cpu_bf16: bool = False) -> tuple[dict, dict[int, str]]:
    """Decode and score against the references -> (scores, predictions). Real decoding, not teacher forcing."""
    predictions = predict(model, loader, device, beam_size, max_len, length_penalty, amp,
                          no_repeat_ngram=no_repeat_ngram, cpu_bf16=cpu_bf16)
    return score_predictions(predictions, references, meteor), predictions


def score_predictions(predictions: dict[int, str], references: list[list[str]], meteor: bool = False) -> dict:
    """Score the captions decoded for some of the images against those images' references; a ValueError when no
    image could be read."""
    if not predictions:
        raise ValueError(f"none of the {len(references)} images could be read (each is named in a warning above)")
    return score_captions({i: references[i] for i in predictions}, predictions, meteor=meteor)
