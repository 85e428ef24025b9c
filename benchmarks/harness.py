"""One training run, and the interleaved per-step timing, in a plain PyTorch loop.

A run trains a freshly seeded model with one optimizer for a fixed number of steps on a seeded
data order, under the shared learning-rate schedule. The clock runs only while training:
evaluations (validation and test, at evenly spaced steps) are excluded from the seconds.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.optimizers import BY_NAME, Optimizer
from benchmarks.tasks import TASKS, Budget, Task, lr_factor

# Sophia's create_graph backward warns about a grad/param reference cycle; the loop drops the
# gradients every step (zero_grad(set_to_none=True)), which is the remedy the warning names.
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")

_DATA: dict[tuple[str, str], tuple[TensorDataset, TensorDataset, TensorDataset, int]] = {}


def task_data(task: Task, profile: str) -> tuple[TensorDataset, TensorDataset, TensorDataset, int]:
    """(train, val, test, vocabulary/classes), loaded once per process."""
    key = (task.name, profile)
    if key not in _DATA:
        _DATA[key] = task.load(profile, task.budgets[profile])
    return _DATA[key]


@dataclass(frozen=True)
class Job:
    phase: str  # "sweep", "final" or "stability"
    task: str
    profile: str
    optimizer: str
    lr: float
    seed: int
    steps: int
    evals: int  # evaluation points after step 0 (a sweep/stability run: only the last)
    damping: float | None = None


# ---------------------------------------------------------------------------- memory
_LIBC = ctypes.CDLL("libc.so.6") if Path("/proc/self/status").exists() else None


def _status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return math.nan


def reset_peak_rss() -> float:
    """Return freed heap to the OS and reset the kernel's peak-RSS mark (Linux); returns the
    current RSS in MiB, the baseline a run's peak is measured against."""
    if _LIBC is None:
        return math.nan
    _LIBC.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return math.nan
    return _status_kib("VmRSS") / 1024


def peak_rss() -> float:
    return _status_kib("VmHWM") / 1024 if _LIBC is not None else math.nan


# ---------------------------------------------------------------------------- training
def _set_lr(opt: Optimizer, base: list[float], factor: float) -> None:
    for group, lr in zip(opt.param_groups, base, strict=True):
        group["lr"] = lr * factor


def train(job: Job) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Runs one job; returns its runs.csv row and its curve points."""
    task = TASKS[job.task]
    train_set, val_set, test_set, vocab = task_data(task, job.profile)
    torch.manual_seed(job.seed)
    model = task.model(vocab)
    baseline = reset_peak_rss()
    opt = BY_NAME[job.optimizer].make(model, job.lr, job.damping)
    base_lrs = [group["lr"] for group in opt.param_groups]
    loader = DataLoader(
        train_set,
        # The tiny profile's generated sets can be smaller than a large-batch task's batch.
        batch_size=min(task.batch_size, len(train_set)),
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(job.seed),
    )
    eval_at = {round(job.steps * k / job.evals) for k in range(job.evals + 1)}
    if job.phase != "final":
        eval_at = {job.steps}
    curve: list[dict[str, object]] = []
    seconds, losses, norms, window = 0.0, [], [], []
    val = test = math.nan
    step, diverged = 0, False
    batches = iter(loader)
    peak = 0.0
    while True:
        if step in eval_at:
            # Peak memory is of training only: read it before evaluating, reset it after.
            peak = max(peak, peak_rss() - baseline)
            val, test = task.evaluate(model, val_set), task.evaluate(model, test_set)
            reset_peak_rss()
            mean_loss = statistics.fmean(window) if window else math.nan
            curve.append(
                dict(
                    step=step,
                    seconds=round(seconds, 3),
                    train_loss=mean_loss,
                    val_metric=val,
                    test_metric=test,
                )
            )
            window = []
        if step >= job.steps or diverged:
            break
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        start = time.perf_counter()
        _set_lr(opt, base_lrs, lr_factor(step, job.steps))
        loss, norm = opt.step(lambda x=x, y=y: task.loss(model(x), y))
        seconds += time.perf_counter() - start
        step += 1
        losses.append(loss)
        norms.append(norm)
        window.append(loss)
        if not math.isfinite(loss):
            diverged = True
            eval_at.add(step)
    final_loss = statistics.fmean(losses[-20:]) if losses else math.nan
    first_loss = losses[0] if losses else math.nan
    finite_norms = [n for n in norms if math.isfinite(n)]
    row = dict(
        phase=job.phase,
        task=job.task,
        optimizer=job.optimizer,
        lr=job.lr,
        damping="" if job.damping is None else job.damping,
        seed=job.seed,
        steps=step,
        train_seconds=round(seconds, 3),
        final_train_loss=final_loss,
        final_val=val,
        best_val=_best([p["val_metric"] for p in curve], task.higher_is_better),
        final_test=test,
        test_loss=math.nan,
        mean_grad_norm=statistics.fmean(finite_norms) if finite_norms else math.nan,
        peak_rss_mib=round(peak, 1),
        state_mib=round(opt.state_bytes() / 2**20, 3),
        # Failed: the loss went non-finite, or training ends without having learnt anything
        # (final loss not below 95 % of the first step's, e.g. collapsed to uniform outputs).
        diverged=diverged or not final_loss < 0.95 * first_loss,
        train_metric=math.nan,
        sharpness=math.nan,
        # GRNG optimizers: the fraction of steps whose KL-clip scale was below 1.
        kl_clip_bind_rate=opt.opt.diagnostics.get("kl_clip_bind_rate", math.nan)
        if opt.grng
        else math.nan,
    )
    if task.metric == "accuracy" and not diverged:
        row["test_loss"] = task.evaluate(model, test_set, "loss")
    elif task.metric == "loss":
        row["test_loss"] = test
    if task.generalization and job.phase == "final" and not diverged:
        row["train_metric"] = task.evaluate(model, train_set)
        row["sharpness"] = top_hessian_eigenvalue(model, task.loss, train_set)
    points = [dict(task=job.task, optimizer=job.optimizer, seed=job.seed, **p) for p in curve]
    return row, points if job.phase == "final" else []


def top_hessian_eigenvalue(
    model: torch.nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: TensorDataset,
    samples: int = 1024,
    iters: int = 20,
) -> float:
    """Sharpness: the largest eigenvalue of the Hessian of the mean training loss on the first
    ``samples`` training examples, by power iteration on exact Hessian-vector products (double
    backprop). Seeded start, so the same weights give the same number."""
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = (t[:samples] for t in data.tensors)
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    eigenvalue = math.nan
    for _ in range(iters):
        norm = torch.sqrt(sum((u * u).sum() for u in v))
        v = [u / norm for u in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        eigenvalue = float(sum((h * u).sum() for h, u in zip(hv, v, strict=True)))
        v = [h.detach() for h in hv]
    return eigenvalue


def _best(values: list[float], higher: bool) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    return max(finite) if higher else min(finite)


# ---------------------------------------------------------------------------- step time
def step_time(
    task_name: str, profile: str, lrs: dict[str, float], rounds: int, warmup: int = 10
) -> list[dict[str, object]]:
    """Per-step time of every optimizer, interleaved: each round times one full step (forward,
    backward, optimizer step) of each optimizer on the same batch, alternating the order, so
    the shared machine's drifts hit all of them alike. Reported: the mean over the rounds (so
    work done every k-th step, such as curvature statistics, inverses or Sophia's Hessian
    estimate, is amortized; use a multiple of 20 rounds) and its ratio to AdamW's mean."""
    task = TASKS[task_name]
    train_set, _, _, vocab = task_data(task, profile)
    torch.manual_seed(0)
    model = task.model(vocab)
    runners = []
    for name, lr in lrs.items():
        copy = task.model(vocab)
        copy.load_state_dict(model.state_dict())
        runners.append((name, copy, BY_NAME[name].make(copy, lr)))
    loader = DataLoader(
        train_set,
        batch_size=task.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    batches = [b for b, _ in zip(loader, range(16), strict=False)]
    times: dict[str, list[float]] = {name: [] for name in lrs}
    for r in range(warmup + rounds):
        x, y = batches[r % len(batches)]
        order = runners if r % 2 == 0 else runners[::-1]
        for name, copy, opt in order:
            start = time.perf_counter()
            opt.step(lambda m=copy, x=x, y=y: task.loss(m(x), y))
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    ref = times["AdamW"]
    return [
        dict(
            task=task_name,
            optimizer=name,
            ms_per_step=round(1000 * statistics.fmean(t), 3),
            ratio_to_adamw=round(sum(t) / sum(ref), 3),
            rounds=rounds,
            threads=torch.get_num_threads(),
            batch_size=task.batch_size,
        )
        for name, t in times.items()
    ]


def budget(task: str, profile: str) -> Budget:
    return TASKS[task].budgets[profile]
