"""Training under torchrun: 2 CPU processes with Gloo run scripts/train.py on a tiny synthetic config.

Each rank's evidence comes from a small launcher written into tmp_path: it wraps captioning.training's
train_one_epoch (to save that rank's weights and per-step losses after every epoch) and save_checkpoint (to record
which rank wrote which file), then runs scripts/train.py as __main__, so the real CLI and training loop are tested.

Why the runs are comparable: the sampler gives rank r the indices r, r + 2, ... of each epoch's permutation, so two
ranks of B images see together exactly the 2B images a single process sees in one step. DDP averages gradients over
ranks, which equals the single process's gradient when every caption row weighs the same in the loss: each image
gives the same number of captions (data.captions_per_image) and every caption is cut to the same length
(data.max_caption_len=3; the shortest synthetic caption has 3 words), so each rank's token-mean loss covers as many
tokens. Dropout is 0 and the learning rate constant, so a run stopped after one epoch and resumed is the same run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from captioning.config import save_config

REPO = Path(__file__).resolve().parents[1]
PER_RANK_BATCH = 4

LAUNCHER = '''
import os, runpy, sys, time
import torch
import captioning.training as training

evidence, train_script, rank = sys.argv[1], sys.argv[2], int(os.environ.get("RANK", "0"))
run_epoch, save = training.train_one_epoch, training.save_checkpoint

def train_one_epoch(net, loader, optimizer, scheduler, scaler, device, cfg, progress, *args, **kwargs):
    loss = run_epoch(net, loader, optimizer, scheduler, scaler, device, cfg, progress, *args, **kwargs)
    model = getattr(net, "module", net)  # DistributedDataParallel wraps the model under torchrun
    torch.save({"model": model.state_dict(), "losses": list(progress.losses), "steps": progress.step_in_epoch},
               os.path.join(evidence, f"rank{rank}_epoch{progress.epoch}.pt"))
    return loss

def save_checkpoint(state, path):
    with open(os.path.join(evidence, f"saves_rank{rank}.txt"), "a") as f:
        f.write(os.path.basename(str(path)) + "\\n")
    time.sleep(float(os.environ.get("SAVE_SECONDS", "0")))  # a slow disk, or a large model
    save(state, path)

# On rank 1 only: these (1-based) calls of caption_loss give NaN, and this one sends the process SIGTERM
nan_calls = {int(n) for n in os.environ.get("NAN_LOSS_CALLS_RANK1", "").split(",") if n}
sigterm_call = int(os.environ.get("SIGTERM_RANK1_AT_CALL", "0"))
if rank == 1 and (nan_calls or sigterm_call):
    import signal
    import captioning.engine as engine
    real_loss, calls = engine.caption_loss, []

    def caption_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == sigterm_call:
            os.kill(os.getpid(), signal.SIGTERM)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) in nan_calls else loss

    engine.caption_loss = caption_loss

empty_call = int(os.environ.get("EMPTY_BATCH_RANK1_AT_CALL", "0"))  # rank 1's batch of this call: none readable
if rank == 1 and empty_call:
    real_collate, collated = training.collate_train, []

    def collate_train(items):
        collated.append(1)
        return {"skipped": ["every image unreadable"]} if len(collated) == empty_call else real_collate(items)

    training.collate_train = collate_train

wait = training.barrier

def barrier():
    open(os.path.join(evidence, f"barrier_rank{rank}"), "a").close()
    wait()

training.train_one_epoch, training.save_checkpoint, training.barrier = train_one_epoch, save_checkpoint, barrier
sys.argv = [train_script, *sys.argv[3:]]
runpy.run_path(train_script, run_name="__main__")
'''


def _config(tmp_path: Path, name: str, batch_size: int, epochs: int, **overrides) -> Path:
    cfg = tiny_config(tmp_path / name / "run", **{
        "data.num_train": 16, "data.num_val": 4, "data.captions_per_image": 2, "data.max_caption_len": 3,
        "model.embed_dim": 8, "model.hidden_dim": 16, "model.attention_dim": 8, "train.batch_size": batch_size,
        "train.epochs": epochs, "train.lr_schedule": "constant", "train.early_stop_patience": 0,
        "train.device": "cpu", "train.max_decode_len": 4, **overrides})
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, path)
    return path


def _command(tmp_path: Path, evidence: Path, torchrun: list[str], args: list[str]) -> list[str]:
    """The command that runs scripts/train.py with `args` through the launcher, under torchrun with the `torchrun`
    options unless they are empty; the launcher saves its evidence in `evidence`."""
    evidence.mkdir(parents=True, exist_ok=True)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    prefix = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    return [*prefix, str(launcher), str(evidence), str(REPO / "scripts" / "train.py"), *args]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}  # one thread per rank: 2 ranks share CI's 2 CPU cores


def _launch(tmp_path: Path, name: str, args: list[str], nproc: int, **env: str) -> Path:
    """Run scripts/train.py with `args` through the launcher (under torchrun when nproc > 1), with `env` added to
    the environment -> evidence folder."""
    evidence = tmp_path / name / "evidence"
    torchrun = ["--nproc_per_node", str(nproc), "--standalone"] if nproc > 1 else []
    result = subprocess.run(_command(tmp_path, evidence, torchrun, args), cwd=tmp_path, env=_env(**env),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return evidence


def _evidence(folder: Path, rank: int, epoch: int) -> dict:
    return torch.load(folder / f"rank{rank}_epoch{epoch}.pt", weights_only=True)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    diffs = {k: (x.float() - b[k].float()).abs().max().item() for k, x in a.items()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= atol, f"{worst} differs by up to {diffs[worst]:.2e} (tolerance {atol:.0e})"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A single-process run of 2 epochs at batch 2B; a 2-rank run of B per rank stopped after 1 epoch, then resumed
    under torchrun to 2 epochs."""
    tmp = tmp_path_factory.mktemp("distributed")
    single = _launch(tmp, "single", ["--config", str(_config(tmp, "single", 2 * PER_RANK_BATCH, 2))], nproc=1)
    ddp = _launch(tmp, "ddp", ["--config", str(_config(tmp, "ddp", PER_RANK_BATCH, 1))], nproc=2)
    last = tmp / "ddp" / "run" / "last.pt"
    first_epoch = torch.load(last, weights_only=True)
    resumed = _launch(tmp, "resumed", ["--resume", str(last), "--set", "train.epochs=2"], nproc=2)
    return {"single": single, "ddp": ddp, "resumed": resumed, "ddp_run": tmp / "ddp" / "run",
            "first_epoch": first_epoch}


def test_ranks_hold_identical_weights(runs):
    for folder, epoch in ((runs["ddp"], 0), (runs["resumed"], 1)):
        rank0, rank1 = _evidence(folder, 0, epoch), _evidence(folder, 1, epoch)
        assert rank0["steps"] == rank1["steps"] == 2  # 16 images / 2 ranks / 4 per step
        for key, weight in rank0["model"].items():
            assert torch.equal(weight, rank1["model"][key]), f"{key} differs between ranks after epoch {epoch}"


def test_two_ranks_match_one_process_on_the_global_batch(runs):
    single, rank0, rank1 = (_evidence(f, r, 0) for f, r in ((runs["single"], 0), (runs["ddp"], 0), (runs["ddp"], 1)))
    assert single["steps"] == rank0["steps"] == 2
    # DDP's gradient is the mean of the ranks' gradients, so the mean of the ranks' losses is the global loss.
    ddp_losses = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])]
    assert ddp_losses == pytest.approx(single["losses"], rel=1e-5)
    assert rank0["losses"] != pytest.approx(rank1["losses"], rel=1e-3)  # the ranks really saw different captions
    _assert_close(rank0["model"], single["model"], atol=1e-5)


def test_only_rank_zero_writes(runs):
    assert not (runs["ddp"] / "saves_rank1.txt").exists()
    assert (runs["ddp"] / "saves_rank0.txt").read_text().split() == ["best.pt", "last.pt"]
    run = runs["ddp_run"]
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.pt", "config.yaml", "last.pt", "metrics.jsonl",
                                                     "vocab.json"]  # .lock: rank 0's, held while it writes the run
    # The checkpoint holds the weights both ranks trained to (a rank-1 write would not change this, but would add lines
    # to metrics.jsonl and names to saves_rank1.txt).
    checkpoint, trained = runs["first_epoch"]["model"], _evidence(runs["ddp"], 0, 0)["model"]
    assert all(torch.equal(weight, trained[key]) for key, weight in checkpoint.items())


def test_resume_under_torchrun_continues_the_run(runs):
    records = [json.loads(line) for line in (runs["ddp_run"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert [r["step"] for r in records] == [2, 4]
    assert not (runs["resumed"] / "saves_rank1.txt").exists()
    # Stopped after epoch 1 and resumed for epoch 2 on 2 ranks == 2 uninterrupted epochs on one process.
    single, resumed = _evidence(runs["single"], 0, 1), _evidence(runs["resumed"], 0, 1)
    ddp_losses = [(a + b) / 2 for a, b in zip(resumed["losses"], _evidence(runs["resumed"], 1, 1)["losses"])]
    assert ddp_losses == pytest.approx(single["losses"], rel=1e-5)
    _assert_close(resumed["model"], single["model"], atol=1e-5)


def test_a_run_of_two_processes_is_not_resumed_by_one(runs):
    last = runs["ddp_run"] / "last.pt"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--resume", str(last), "--set",
                             "train.epochs=3"], env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "written by a run of 2 process(es), and this one has 1" in result.stderr
    assert "resume under torchrun with 2 processes in all" in result.stderr


def test_a_resumed_run_with_dropout_draws_what_the_uninterrupted_one_drew_on_every_rank(tmp_path):
    """Each rank draws its own dropout masks: a resume must give every rank its own random numbers back."""
    # captions of their own lengths: the ranks draw different amounts of random numbers (scheduled sampling would
    # ramp over train.epochs, which the resume raises)
    noisy = {"model.dropout": 0.3, "data.max_caption_len": 16}
    straight = _launch(tmp_path, "straight", ["--config", str(_config(tmp_path, "straight", PER_RANK_BATCH, 2,
                                                                        **noisy))], nproc=2)
    _launch(tmp_path, "stopped", ["--config", str(_config(tmp_path, "stopped", PER_RANK_BATCH, 1, **noisy))], nproc=2)
    resumed = _launch(tmp_path, "resumed", ["--resume", str(tmp_path / "stopped" / "run" / "last.pt"), "--set",
                                            "train.epochs=2"], nproc=2)
    for rank in (0, 1):
        want, got = _evidence(straight, rank, 1), _evidence(resumed, rank, 1)
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-6)
        _assert_close(got["model"], want["model"], atol=1e-6)


def test_a_loss_that_is_not_finite_on_one_rank_is_skipped_on_both(tmp_path):
    """Rank 1's second step has a NaN loss: both ranks skip that step (a rank that went on would wait for the other
    in DDP's gradient all-reduce) and train on with the same weights."""
    config = _config(tmp_path, "nan", PER_RANK_BATCH, 1)
    evidence = _launch(tmp_path, "nan", ["--config", str(config)], nproc=2, NAN_LOSS_CALLS_RANK1="2")
    rank0, rank1 = _evidence(evidence, 0, 0), _evidence(evidence, 1, 0)
    assert rank0["steps"] == rank1["steps"] == 2
    assert all(torch.equal(weight, rank1["model"][key]) for key, weight in rank0["model"].items())
    progress = torch.load(tmp_path / "nan" / "run" / "last.pt", weights_only=True)["progress"]
    assert progress["skipped_nonfinite"] == 1


def test_a_batch_with_no_readable_image_on_one_rank_is_skipped_on_both(tmp_path):
    config = _config(tmp_path, "empty", PER_RANK_BATCH, 1)
    evidence = _launch(tmp_path, "empty", ["--config", str(config)], nproc=2, EMPTY_BATCH_RANK1_AT_CALL="2")
    rank0, rank1 = _evidence(evidence, 0, 0), _evidence(evidence, 1, 0)
    assert rank0["steps"] == rank1["steps"] == 2 and len(rank0["losses"]) == len(rank1["losses"]) == 1
    assert all(torch.equal(weight, rank1["model"][key]) for key, weight in rank0["model"].items())


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """A signal that reaches one process only (kill of one PID, or Ctrl-C landing between two ranks' checks): every
    rank stops after the same step, and rank 0 writes last.pt there. A rank that went on would wait in the next
    gradient all-reduce for the one that stopped, and rank 0 fail before saving. The save takes a second: a rank
    that exited before it ended would have torchrun stop rank 0 in the middle of it."""
    config = _config(tmp_path, "one", PER_RANK_BATCH, 2)  # 2 steps per epoch
    evidence = tmp_path / "one" / "evidence"
    torchrun = ["--nproc_per_node", "2", "--standalone"]
    result = subprocess.run(_command(tmp_path, evidence, torchrun, ["--config", str(config)]), cwd=tmp_path,
                            env=_env(SIGTERM_RANK1_AT_CALL="3", SAVE_SECONDS="1"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "stopped by signal 15 at epoch 2 step 1" in result.stderr, result.stderr[-3000:]
    assert torch.load(tmp_path / "one" / "run" / "last.pt", weights_only=True)["progress"]["global_step"] == 3
    resumed = _launch(tmp_path, "one", ["--resume", str(tmp_path / "one" / "run" / "last.pt")], nproc=2)
    assert _evidence(resumed, 0, 1)["steps"] == 2


def test_two_machines_without_a_shared_filesystem(tmp_path):
    """Two torchrun agents rendezvous as two machines (--nnodes=2, c10d), each in its own folder with the config's
    relative paths, as on machines that share no filesystem: each machine gets its own feature cache, both ranks
    train the same weights, and one run folder is written, on whichever machine holds global rank 0."""
    cfg = tiny_config(Path("run"), **{"data.num_train": 16, "data.num_val": 4, "train.batch_size": PER_RANK_BATCH,
                                      "train.device": "cpu", "train.max_decode_len": 4,
                                      "data.feature_cache": "features"})
    config, evidence = tmp_path / "config.yaml", tmp_path / "evidence"
    save_config(cfg, config)
    with socket.socket() as s:  # a free port for the rendezvous store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-machines"]
    machines = [tmp_path / f"machine{n}" for n in range(2)]
    agents = []
    for folder in machines:
        folder.mkdir()
        agents.append(subprocess.Popen(_command(tmp_path, evidence, torchrun, ["--config", str(config)]), cwd=folder,
                                       env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [agent.communicate(timeout=180)[0] for agent in agents]
    finally:  # an agent left waiting for a peer that never came would hold its port and the other's rendezvous
        for agent in agents:
            agent.kill()
    for agent, log in zip(agents, logs):
        assert agent.returncode == 0, f"training failed:\n{log[-3000:]}"
    for folder in machines:
        assert sorted(p.name for p in (folder / "features").iterdir()) == ["train.json", "train.npy", "val.json",
                                                                             "val.npy"]
    assert sum((folder / "run" / "last.pt").exists() for folder in machines) == 1
    assert sorted(p.name for p in evidence.glob("saves_rank*")) == ["saves_rank0.txt"]
    rank0, rank1 = _evidence(evidence, 0, 0), _evidence(evidence, 1, 0)
    assert rank0["steps"] == rank1["steps"] == 2  # 16 images / 2 ranks / 4 per step
    assert all(torch.equal(weight, rank1["model"][key]) for key, weight in rank0["model"].items())


def test_ctrl_c_while_rank_zero_caches_features_stops_every_rank_without_a_traceback(tmp_path):
    """Ctrl-C in the terminal reaches torchrun and every rank. Rank 0 stops its extraction with its one line; rank 1,
    waiting at the barrier meanwhile, exits when rank 0's exit breaks the barrier, without a traceback."""
    cache = tmp_path / "features"
    config = _config(tmp_path, "stop", PER_RANK_BATCH, 1, **{"data.feature_cache": str(cache),
                                                              "data.num_train": 20000})
    evidence = tmp_path / "stop" / "evidence"
    torchrun = ["--nproc_per_node", "2", "--standalone"]
    job = subprocess.Popen(_command(tmp_path, evidence, torchrun, ["--config", str(config)]), cwd=tmp_path,
                           env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # its own process group, as a terminal's job has
    try:
        deadline = time.monotonic() + 120
        while not ((cache / ".train.npy.tmp").exists() and (evidence / "barrier_rank1").exists()):
            assert job.poll() is None and time.monotonic() < deadline, "the run never reached the barrier"
            time.sleep(0.1)
        assert not (evidence / "barrier_rank0").exists()  # rank 0 is still extracting
        os.killpg(job.pid, signal.SIGINT)
        log = job.communicate(timeout=60)[0]
    finally:
        job.kill()
    assert "stopped by signal 2 while caching the train split's features" in log
    rank1 = [line for line in log.splitlines() if line.startswith("[rank1]")]
    assert not any("Traceback" in line for line in rank1), "\n".join(rank1[-30:])
    assert sorted(p.name for p in cache.iterdir()) == []
