"""A training run: data, model, optimiser, per-epoch validation decoding, checkpoints, resume, torchrun."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from captioning.checkpoint import CheckpointError, check_finite, load_checkpoint, remove_stale_temps, save_checkpoint
from captioning.config import Config, ConfigError, save_config
from captioning.data.datasets import (
    EpochSampler,
    EvalDataset,
    ImageLoader,
    InputLoader,
    Preprocess,
    TrainDataset,
    build_source,
    build_vocab,
    collate_eval,
    collate_train,
    encode_captions,
)
from captioning.data.features import FeatureLoader, cache_record, extract_features
from captioning.data.sources import CaptionSource
from captioning.distributed import (
    barrier,
    broadcast_object,
    cleanup,
    gather_objects,
    init_distributed,
    is_main,
    local_rank,
    max_over_ranks,
)
from captioning.engine import (
    StepState,
    StopFlag,
    Stopped,
    check_cpu_bf16,
    grad_scaler,
    keep_freed_memory,
    leave_signals_to_main,
    predict,
    resolve_device,
    score_predictions,
    train_one_epoch,
)
from captioning.files import check_writable, lock_exclusive, not_utf8_error
from captioning.models import Captioner
from captioning.models.decoder import load_word_vectors
from captioning.rewards import SampleRewards
from captioning.vocab import Vocabulary, tokenize

log = logging.getLogger(__name__)


def build_optimizer(model: Captioner, cfg: Config) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": cfg.train.lr}]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": cfg.train.encoder_lr})
    # The fused kernel updates all parameters in one pass; on a 2-core CPU it took the decoder's Adam step from 12.6 to
    # 5.6 ms (10M parameters). Other devices keep torch's default implementation.
    fused = True if next(model.parameters()).device.type in ("cpu", "cuda") else None
    return torch.optim.Adam(groups, weight_decay=cfg.train.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    """Stepped once per training step (plateau: once per epoch on the validation metric)."""
    t = cfg.train
    if t.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=t.lr_gamma, patience=1)
    total = max(1, t.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
        if t.lr_schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        if t.lr_schedule == "step":
            return warm * t.lr_gamma ** (step // (t.lr_step_epochs * steps_per_epoch))
        return warm

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _set_self_critical_lr(optimizer: torch.optim.Optimizer, cfg: Config) -> None:
    """The self-critical epochs run at the constant train.scst_lr (a trained encoder at the same fraction of its
    rate); the cross-entropy schedule is not stepped in them."""
    ratio = cfg.train.scst_lr / cfg.train.lr
    for group, lr in zip(optimizer.param_groups, (cfg.train.lr, cfg.train.encoder_lr)):
        group["lr"] = lr * ratio


def _add_to_average(average: dict[str, Any], model: Captioner, epoch: int) -> None:
    """Fold the model's weights after `epoch` into the running mean average["model"] (checkpoint averaging: the
    mean of the last few epochs' weights usually decodes better than any one of them). Integer buffers keep their
    latest value."""
    n = len(average["epochs"]) + 1
    for key, value in model.state_dict().items():
        mean = average["model"].get(key)
        if mean is None or not value.is_floating_point():
            average["model"][key] = value.detach().clone()
        else:
            mean.add_(value - mean, alpha=1 / n)
    average["epochs"].append(epoch)


def _wait_for_cache(device: torch.device) -> None:
    """The barrier at which ranks wait while another extracts a feature cache. Ctrl-C to the whole job stops the
    extracting rank with its own message. With Gloo (CPU) its exit breaks the barrier, and a rank stopped while
    waiting then exits with 128 + the signal, without a traceback of its own. NCCL's barrier does not return when a
    peer exits, so there the signals keep their default actions, and torchrun's SIGTERM ends the waiting ranks."""
    if device.type != "cpu":
        barrier()
        return
    with StopFlag() as stop:
        try:
            barrier()
        except RuntimeError:  # the peer that closed the connection
            if stop.signal is None:
                raise
    if stop.signal is not None:
        raise SystemExit(128 + stop.signal)


def _input_loaders(cfg: Config, model: Captioner, preprocess: Preprocess, train_src: CaptionSource,
                   val_src: CaptionSource, device: torch.device) -> tuple[InputLoader, InputLoader]:
    """Images through the encoder in the loop, or features from the cache (extracted first if missing)."""
    if not cfg.data.feature_cache:
        return ImageLoader(train_src, preprocess, cfg.data.augment), ImageLoader(val_src, preprocess)
    loaders = []
    for split, source in (("train", train_src), ("val", val_src)):
        record = cache_record(cfg, model.encoder, preprocess, source)
        folder = Path(cfg.data.feature_cache)
        # Global rank 0 extracts a missing cache while the others wait. A machine that still has none after that
        # (several machines without a shared filesystem) then extracts its own copy, on its first process.
        for extracts in (is_main(), local_rank() == 0):
            if extracts and not (folder / f"{split}.json").exists():
                try:
                    extract_features(model.encoder, source, preprocess, folder, split, record, device,
                                     num_workers=cfg.data.num_workers)
                except Stopped as e:
                    log.warning("stopped by signal %d while caching the %s split's features in %s (splits cached "
                                "before it are kept); run the same command again to go on", e.signum, split, folder)
                    raise SystemExit(128 + e.signum) from None
            _wait_for_cache(device)
        loaders.append(FeatureLoader(folder, split, record))
        if loaders[-1].unreadable and is_main():  # left out without a warning per image and epoch
            log.warning("feature cache: %d of the %d %s images could not be read when it was made and are left out "
                        "(listed in %s)", len(loaders[-1].unreadable), len(source), split, loaders[-1].meta_path)
    if cfg.data.augment and is_main():
        log.info("feature cache: training images are not augmented (features are computed once)")
    return loaders[0], loaders[1]


def _epoch_list(epochs: list[int]) -> str:
    """[0] -> 'epoch 1', [2, 3] -> 'epochs 3, 4' (epochs count from 1 in messages)."""
    return ("epoch " if len(epochs) == 1 else "epochs ") + ", ".join(str(e + 1) for e in epochs)


def _save_average(model: Captioner, average: dict[str, Any], cfg: Config, vocab: Vocabulary, val_loader: DataLoader,
                  val_refs: list[list[str]], device: torch.device, path: Path) -> None:
    """Validate the averaged weights as every epoch is validated, and write them as a model checkpoint."""
    model.load_state_dict(average["model"])
    predictions = predict(model, val_loader, device, cfg.train.val_beam_size, cfg.train.max_decode_len,
                          amp=cfg.train.amp, cpu_bf16=cfg.train.cpu_bf16)
    scores = score_predictions(predictions, val_refs)
    if is_main():
        save_checkpoint({"config": cfg.to_dict(), "vocab": vocab.to_dict(), "model": average["model"],
                         "averaged_epochs": average["epochs"], "val": scores}, path)
        print(f"averaged the weights of {_epoch_list(average['epochs'])}: val BLEU-4 {scores['Bleu_4']:.3f} CIDEr "
              f"{scores['CIDEr']:.3f}; checkpoint {path}", flush=True)


# What a resumed run cannot change: the optimizer's and schedule's state, the batches and the model's shape all
# continue from the checkpoint, so a new value would be recorded but not applied (or the weights would not load).
FIXED_ON_RESUME = (
    "data.dataset", "data.captions_per_image", "data.max_caption_len", "data.min_word_count", "data.image_size",
    "model.encoder", "model.trainable_layers", "model.grid_size", "model.decoder", "model.cell", "model.num_layers",
    "model.embed_dim", "model.hidden_dim", "model.attention_dim",
    "train.batch_size", "train.lr", "train.encoder_lr", "train.weight_decay", "train.lr_schedule",
    "train.lr_step_epochs", "train.lr_gamma", "train.warmup_steps", "train.seed",
)


def _check_resumable(cfg: Config, state: dict[str, Any], resume: str | Path, world: int) -> None:
    if "progress" not in state:
        raise CheckpointError(f"{resume} holds a model's weights only, not a run's progress; resume from the run's "
                              "last.pt")
    saved_world = state.get("world_size", world)  # absent from checkpoints written before it was recorded
    if saved_world != world:
        how = "without torchrun" if saved_world == 1 else f"under torchrun with {saved_world} processes in all"
        raise ConfigError(f"{resume} was written by a run of {saved_world} process(es), and this one has {world}: "
                          "each process's shard, the steps per epoch and the learning-rate schedule depend on that "
                          f"number, so resume {how}")
    old = Config.from_dict(state["config"]).to_dict()
    new = cfg.to_dict()
    changed = [f"{key} {old[s][k]} -> {new[s][k]}" for key in FIXED_ON_RESUME
               for s, k in [key.split(".")] if old[s][k] != new[s][k]]
    if changed:
        raise ConfigError(f"{resume}: {', '.join(changed)}: a resumed run continues its optimizer, schedule and "
                          "batches, so these keys cannot change; resume without them, or start a new run")
    done, t = state["progress"]["epoch"], cfg.train
    if done > old["train"]["epochs"] and t.epochs != old["train"]["epochs"]:
        raise ConfigError(f"{resume}: train.epochs {old['train']['epochs']} -> {t.epochs}, but the run has begun its "
                          "self-critical epochs, which follow the train.epochs cross-entropy ones; train longer with "
                          f"--set train.scst_epochs={t.scst_epochs + 2} instead")
    if done >= t.epochs + t.scst_epochs:
        more = f"train.scst_epochs={t.scst_epochs + 2}" if t.scst_epochs else f"train.epochs={t.epochs + 5}"
        raise ConfigError(f"{resume} has trained all {done} epochs of its run (train.epochs {t.epochs} + "
                          f"train.scst_epochs {t.scst_epochs}); to train on, raise them, e.g. --set {more}")
    bad, patience = state["best"]["bad_epochs"], t.early_stop_patience
    if patience and bad >= patience and (done > t.epochs or not t.scst_epochs):  # the loop's stop_run
        raise ConfigError(f"{resume}: the run stopped early after epoch {done} ({t.select_metric} had not improved "
                          f"in {bad} epochs, train.early_stop_patience {patience}); to train on, raise it, e.g. "
                          f"--set train.early_stop_patience={bad + 2}")
    if Path(resume).name != "last.pt" and is_main():
        log.warning("resuming from %s (epoch %d): the run goes on from there, and its later epochs, last.pt and "
                    "metrics.jsonl lines are written again", resume, state["progress"]["epoch"] + 1)


# The files a run writes that a new run in the folder would replace or truncate (config.yaml and vocab.json alone are
# rewritten alike by a run that restarts after failing before its first epoch ended).
RUN_FILES = ("last.pt", "best.pt", "averaged.pt", "metrics.jsonl")


def _claim_run_folder(out_dir: Path, resume: str | Path | None, epoch: int) -> IO:
    """Make sure this process can write the run folder, is the only one writing it and finds no other run there, and
    drop the metrics.jsonl lines of `epoch` on, which the run writes again -> the open lock file, whose closing (or
    the process's end, however it comes) releases the lock."""
    try:  # now, not at the first checkpoint, an epoch of training later
        check_writable(out_dir)
    except OSError as e:
        raise ConfigError(f"train.out_dir {out_dir} cannot be written ({e.strerror}); make it writable, or choose "
                          "another folder with --set train.out_dir=...") from None
    lock = open(out_dir / ".lock", "a")
    try:
        lock_exclusive(lock, f"train.out_dir {out_dir}: another training is writing this run folder; wait for it to "
                             "end, or choose another folder with --set train.out_dir=...")
        _check_no_other_run(out_dir, resume)  # once locked: a run still writing the folder is not "a run" there
        _keep_metrics_before(out_dir / "metrics.jsonl", epoch)
    except BaseException:
        lock.close()
        raise
    return lock


def _check_no_other_run(out_dir: Path, resume: str | Path | None) -> None:
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not found or (resume is not None and out_dir.resolve() == Path(resume).resolve().parent):
        return
    if resume is None:
        raise FileExistsError(f"{out_dir} already holds a run ({found[0]}); continue it with --resume, or choose "
                              "another folder with --set train.out_dir=...")
    raise FileExistsError(f"{out_dir} holds another run ({found[0]}); resume into the checkpoint's own folder, or "
                          "choose an empty one with --set train.out_dir=...")


@contextlib.contextmanager
def _hold_run_folder(out_dir: Path, resume: str | Path | None, epoch: int) -> Iterator[None]:
    """Rank 0, the process that writes the run folder, holds it for the run. When it refuses the folder, every rank
    ends with its error: a rank left to go on would wait in its next collective for one that has ended."""
    lock, refusal = None, None
    if is_main():
        try:
            lock = _claim_run_folder(out_dir, resume, epoch)
        except (ValueError, OSError) as e:
            refusal = e
    refusal = broadcast_object(refusal)
    try:
        if refusal is not None:
            raise refusal
        yield
    finally:
        if lock is not None:
            lock.close()


def _epoch_of(line: str) -> int | None:
    """The epoch a metrics.jsonl line records; None when the line is not such a record."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    epoch = row.get("epoch") if isinstance(row, dict) else None
    return epoch if isinstance(epoch, int) else None


def _keep_metrics_before(path: Path, epoch: int) -> None:
    """Drop the metrics.jsonl lines of `epoch` and later: a resumed run writes them again (it was stopped before
    its last.pt recorded them, or it resumes from an earlier checkpoint such as best.pt)."""
    if not path.exists():
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise not_utf8_error(path, data, "repair or delete the line, then resume again") from None
    lines = text.split("\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        line_epoch = _epoch_of(line)
        if line_epoch is None and number == len(lines):
            # No newline after it: a write that a crash cut short. last.pt is saved after the line, so the run writes
            # that epoch's line again.
            log.warning("%s: dropped its last line, %d characters that a crash cut short while they were written",
                        path, len(line))
        elif line_epoch is None:
            raise ValueError(f"{path}:{number}: not a metrics record ({line[:40]!r}); repair or delete the "
                             "line, then resume again")
        elif line_epoch < epoch:
            kept.append(line + "\n")
    if "".join(kept) != text:
        path.write_text("".join(kept), encoding="utf-8")


def train(cfg: Config, resume: str | Path | None = None) -> Path:
    """Train as `cfg` says; with `resume` (a checkpoint path) continue that run exactly. Returns the run folder."""
    if not cfg.train.out_dir.strip():  # Path("") is the current folder, which the run's files would then litter
        raise ConfigError("config key 'train.out_dir' is empty; name the run folder, e.g. --set "
                          "train.out_dir=runs/my_run")
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        keep_freed_memory()
        if cfg.train.amp and cfg.train.cpu_bf16:
            check_cpu_bf16(device, "train.cpu_bf16")
    rank, world = init_distributed(device)
    out_dir = Path(cfg.train.out_dir)
    state = load_checkpoint(resume) if resume else None
    if state is not None:
        _check_resumable(cfg, state, resume, world)
        check_finite(state["model"], resume)
    with contextlib.ExitStack() as run_folder:  # from when _run claims the run folder to the end of the run
        return _run(cfg, state, resume, device, rank, world, out_dir, run_folder)


def _run(cfg: Config, state: dict[str, Any] | None, resume: str | Path | None, device: torch.device, rank: int,
         world: int, out_dir: Path, run_folder: contextlib.ExitStack) -> Path:
    """The body of train(); `state` is the checkpoint `resume` names, if any. The run folder's claim is entered into
    `run_folder`."""
    torch.manual_seed(cfg.train.seed)  # the decoder's initial weights

    train_src, val_src = build_source(cfg.data, "train"), build_source(cfg.data, "val")
    if state is not None:
        vocab = Vocabulary.from_dict(state["vocab"])
    else:  # rank 0 builds it; every rank uses the same one
        vocab = broadcast_object(build_vocab(train_src, cfg.data.min_word_count) if is_main() else None)
    if cfg.train.val_beam_size > len(vocab):  # found now, not after the first epoch's training
        raise ConfigError(f"train.val_beam_size {cfg.train.val_beam_size} is wider than the vocabulary of {len(vocab)} "
                          "words built from the training captions; lower it")
    model = Captioner(cfg.model, vocab, None if state else cfg.model.encoder_weights)
    if state is not None:  # before the feature cache is checked against the encoder's weights
        model.load_state_dict(state["model"])
    elif cfg.model.word_vectors:
        if not Path(cfg.model.word_vectors).is_file():
            raise ConfigError(f"model.word_vectors {cfg.model.word_vectors}: no such file; name a word2vec or GloVe "
                              "text file, or set it to null")
        found = load_word_vectors(model.decoder.embed, cfg.model.word_vectors, vocab)
        log.info("word vectors: %d of %d vocabulary words found in %s", found, len(vocab), cfg.model.word_vectors)

    preprocess = Preprocess.for_encoder(model.encoder, cfg.data.image_size)
    if state is None:  # a resumed run keeps its size (a fixed key) and grid, with which it has trained
        model.encoder.check_input_size(preprocess.size)
    # Once the config, data and model have passed their checks (a run refused for them leaves no folder behind), and
    # before the first write anywhere (the feature cache)
    run_folder.enter_context(_hold_run_folder(out_dir, resume, state["progress"]["epoch"] if state else 0))
    model.to(device)
    cfg.data.image_size = preprocess.size  # 0 (the weights' crop size) as a number: a checkpoint's model is
    # rebuilt without its pretrained weights, so evaluation, captioning and the demo read the size from here
    train_load, val_load = _input_loaders(cfg, model, preprocess, train_src, val_src, device)
    train_ds = TrainDataset(train_load,
                            encode_captions(train_src, vocab, cfg.data.max_caption_len),
                            cfg.data.captions_per_image, cfg.train.seed)
    val_ds = EvalDataset(val_load, len(val_src))
    val_refs = [s.captions for s in val_src.samples]
    train_sampler = EpochSampler(len(train_ds), shuffle=True, seed=cfg.train.seed, rank=rank, world_size=world)
    loader_args = dict(num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                       worker_init_fn=leave_signals_to_main)
    val_loader = DataLoader(val_ds, cfg.train.batch_size, sampler=EpochSampler(len(val_ds), False, 0, rank, world),
                            collate_fn=collate_eval, **loader_args)
    steps_per_epoch = math.ceil(len(train_sampler) / cfg.train.batch_size)

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = grad_scaler(device, cfg.train.amp)
    progress = StepState()
    best = {"score": float("-inf"), "epoch": -1, "bad_epochs": 0}
    average: dict[str, Any] = {"epochs": [], "model": {}}  # weights of the epochs in the averaging window
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without loss scaling (CPU, bf16 GPU, amp off): a new scaler calibrates
            scaler.load_state_dict(state["scaler"])
        progress = StepState(**state["progress"])
        best = state["best"]
        average = state.get("average", average)
    net = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        model.decoder.compile_step()

    if is_main():
        save_config(cfg, out_dir / "config.yaml")
        vocab.save(out_dir / "vocab.json")
        for name in ("last.pt", "best.pt"):
            for tmp in remove_stale_temps(out_dir / name):
                log.info("removed %s, the temp file of a save that was killed", tmp)
        log.info("%d training images, %d validation images, vocabulary of %d words, %s on %s (x%d)",
                 len(train_src), len(val_src), len(vocab), type(model.decoder).__name__, device, world)

    def checkpoint(path: Path) -> None:
        if is_main():
            save_checkpoint({"config": cfg.to_dict(), "vocab": vocab.to_dict(), "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), "progress": vars(progress), "best": best,
                             "average": average, "world_size": world}, path)

    with StopFlag() as stop:
        def agree_on_stop() -> None:
            # Under torchrun every rank stops at the same point: one that went on would wait in the next collective
            # for one that had stopped, and rank 0 could then fail before writing last.pt
            stop.signal = max_over_ranks(stop.signal or 0, device) or None

        def save_and_stop(when: str) -> None:
            checkpoint(out_dir / "last.pt")
            if is_main():  # the process that wrote last.pt
                log.warning("stopped by signal %d %s; checkpoint %s (continue with --resume)", stop.signal, when,
                            out_dir / "last.pt")
            # The other ranks end only once last.pt is written: when one process exits with an error, torchrun
            # sends SIGTERM to the rest, which would stop rank 0 in the middle of the save
            barrier()
            raise SystemExit(128 + stop.signal)

        def on_step() -> bool:
            agree_on_stop()
            every = cfg.train.save_every_steps
            # Not before a step of the epoch has trained: an epoch whose every batch is unreadable ends in an error,
            # and a last.pt of its skipped steps would replace the run's last good one
            if stop.signal is None and every and progress.losses and progress.global_step % every == 0:
                checkpoint(out_dir / "last.pt")
            return stop.signal is not None

        total_epochs = cfg.train.epochs + cfg.train.scst_epochs
        rewards = None
        while progress.epoch < total_epochs:
            started = time.time()
            self_critical = progress.epoch >= cfg.train.epochs
            if self_critical and rewards is None:
                rewards = SampleRewards([[tokenize(c) for c in s.captions] for s in train_src.samples], vocab,
                                        cfg.train.scst_bleu_weight)
                _set_self_critical_lr(optimizer, cfg)
                if progress.epoch == cfg.train.epochs and progress.step_in_epoch == 0:
                    best["bad_epochs"] = 0  # patience starts again for the new objective
            train_ds.set_epoch(progress.epoch)
            train_sampler.set_epoch(progress.epoch, skip=progress.step_in_epoch * cfg.train.batch_size)
            loader = DataLoader(train_ds, cfg.train.batch_size, sampler=train_sampler, collate_fn=collate_train,
                                generator=torch.Generator().manual_seed(cfg.train.seed + progress.epoch),
                                **loader_args)
            nonfinite_before = progress.skipped_nonfinite
            train_loss = train_one_epoch(net, loader, optimizer, None if self_critical else scheduler, scaler, device,
                                         cfg.train, progress, cfg.train.epochs * steps_per_epoch, on_step,
                                         rewards=rewards)
            agree_on_stop()  # a signal may also come after the epoch's last step
            if stop.signal is not None:
                save_and_stop(f"at epoch {progress.epoch + 1} step {progress.step_in_epoch}")
            if not progress.losses:  # every step of the epoch skipped; the ranks skip together, so all of them end here
                if progress.skipped_nonfinite > nonfinite_before:
                    raise FloatingPointError(f"no training step ran in epoch {progress.epoch + 1}: the loss was not "
                                             "finite on any step; lower train.lr or turn off train.amp")
                why = (f"none of the {len(train_src)} images of the train split could be read" if world == 1 else
                       f"at every step one of the {world} processes could read no image of its batch of the train "
                       f"split's {len(train_src)} images")
                raise ValueError(f"no training step ran in epoch {progress.epoch + 1}: {why} (each is named in a "
                                 "warning above); check data.root and the image files, e.g. with python "
                                 "scripts/check_data.py")
            train_loss = sum(gather_objects(train_loss)) / world  # each rank's mean over its shard, all the same size
            predictions = predict(model, val_loader, device, cfg.train.val_beam_size, cfg.train.max_decode_len,
                                  amp=cfg.train.amp, should_stop=lambda: stop.signal is not None,
                                  cpu_bf16=cfg.train.cpu_bf16)
            agree_on_stop()
            if stop.signal is not None:
                # The epoch's training is done and its validation is not: that is the state saved, so --resume
                # trains no more of this epoch and validates it from the start.
                save_and_stop(f"while validating epoch {progress.epoch + 1} ({len(predictions)} of {len(val_ds)} "
                              "images decoded)")
            scores = score_predictions(predictions, val_refs)
            score = scores[cfg.train.select_metric]
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and not self_critical:
                scheduler.step(score)
            improved = score > best["score"]
            if improved:
                best.update(score=score, epoch=progress.epoch, bad_epochs=0)
            else:
                best["bad_epochs"] += 1
            loss_name = "reward" if self_critical else "loss"
            record = {"epoch": progress.epoch, "step": progress.global_step, f"train_{loss_name}": train_loss,
                      "lr": optimizer.param_groups[0]["lr"], "val": scores, "seconds": round(time.time() - started, 1)}
            window = total_epochs - cfg.train.average_epochs  # the first epoch whose weights are averaged
            if progress.epoch >= window:
                if average["epochs"] and average["epochs"][0] < window:  # a finished run resumed with more epochs
                    if is_main():
                        log.info("averaged.pt starts afresh at epoch %d: the running mean of %s cannot "
                                 "drop them, and they are no longer among the last %d", progress.epoch + 1,
                                 _epoch_list(average["epochs"]), cfg.train.average_epochs)
                    average = {"epochs": [], "model": {}}
                _add_to_average(average, model, progress.epoch)
            patience = cfg.train.early_stop_patience
            out_of_patience = bool(patience) and best["bad_epochs"] >= patience
            stop_run = out_of_patience and (self_critical or not cfg.train.scst_epochs)
            # out of patience in cross-entropy training with self-critical epochs to come: on to those
            progress.epoch = cfg.train.epochs if out_of_patience and not stop_run else progress.epoch + 1
            progress.step_in_epoch = 0
            progress.losses = []
            # last.pt last: once it records the epoch as done, best.pt and the metrics line are on disk
            if improved:
                checkpoint(out_dir / "best.pt")
            if is_main():
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            checkpoint(out_dir / "last.pt")
            if is_main():
                print(f"epoch {record['epoch'] + 1}/{total_epochs}  {loss_name} {train_loss:.3f}  "
                      f"val BLEU-4 {scores['Bleu_4']:.3f} CIDEr {scores['CIDEr']:.3f}  "
                      f"best {cfg.train.select_metric} {best['score']:.3f} (epoch {best['epoch'] + 1})  "
                      f"lr {record['lr']:.1e}  {record['seconds']:.0f}s", flush=True)
                if out_of_patience:
                    then = "" if stop_run else "; self-critical training follows"
                    print(f"early stop: no {cfg.train.select_metric} gain in {patience} epochs{then}", flush=True)
            if stop_run:
                break
    if is_main():
        best_path = out_dir / "best.pt"
        if not best_path.exists() and resume is not None:  # resumed into a new folder; no epoch beat the old best
            best_path = Path(resume).parent / "best.pt"
        print(f"done: best {cfg.train.select_metric} {best['score']:.4f} at epoch {best['epoch'] + 1}; "
              f"checkpoint {best_path}", flush=True)
    if average["epochs"]:
        _save_average(model, average, cfg, vocab, val_loader, val_refs, device, out_dir / "averaged.pt")
    cleanup()
    return out_dir
