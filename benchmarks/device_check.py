"""Device check: per-step time relative to AdamW and SOAP, peak memory and host syncs per step,
on whatever device is present (CUDA if available, else CPU).

Run from the repository root::

    python -m benchmarks.device_check --out DIR            # full: a few minutes on one GPU
    python -m benchmarks.device_check --out DIR --quick    # tiny models, seconds, CPU smoke test

Models (random inputs of the benchmark's shapes, no download): the Fashion-MNIST CNN, the
Shakespeare CharTransformer and the IMDB bag of embeddings at the benchmark's sizes
(``benchmarks/tasks.py``), a larger transformer (width 512, 6 blocks, context 256, batch 32,
built like CharTransformer), and that transformer under bf16 autocast (CUDA and CPU;
``--no-bf16`` leaves it out).

Timing is interleaved: each round runs ``--steps`` full steps (forward, backward, optimizer
step) of every optimizer in turn, alternating the order, so drifts of the machine hit all of
them alike; reported is the median over rounds of the mean step time of a round, and its
ratio to AdamW's and SOAP's. A round of 20 steps spans the GRNG optimizers' statistics
(every 5) and inverse (every 20, staggered) schedules, so their amortized cost is included.
Peak memory (``torch.cuda.max_memory_allocated``) and host syncs per step
(:class:`lightning_grng.diagnostics.SyncCounter`, median and max over one round) are measured
in a separate pass, one optimizer at a time.

Writes ``device_check_<device>.md`` (the table) and ``device_check_<device>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_grng as lg
from lightning_grng.diagnostics import SyncCounter

# ---------------------------------------------------------------------------- models


@dataclass
class Case:
    """One model with a batch maker and a loss; ``bf16`` runs forward and loss in autocast."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator, torch.device], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    bf16: bool = False


def _lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _cls_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), y)


def _images(batch: int, classes: int) -> Callable[..., tuple[Tensor, Tensor]]:
    def make(gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        x = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
        return x, torch.randint(0, classes, (batch,), generator=gen).to(device)

    return make


def _tokens(batch: int, seq: int, vocab: int) -> Callable[..., tuple[Tensor, Tensor]]:
    def make(gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)

    return make


def _reviews(batch: int, seq: int, vocab: int) -> Callable[..., tuple[Tensor, Tensor]]:
    def make(gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        ids = torch.randint(1, vocab, (batch, seq), generator=gen)
        lengths = torch.randint(seq // 4, seq + 1, (batch, 1), generator=gen)
        ids = ids * (torch.arange(seq)[None, :] < lengths)  # 0 = padding
        return ids.to(device), torch.randint(0, 2, (batch,), generator=gen).to(device)

    return make


def cases(quick: bool) -> list[Case]:
    """The models of the check; ``quick`` shrinks every one to a smoke-test size."""
    from benchmarks.tasks import BagOfEmbeddings
    from examples.models import CharTransformer, ImageClassifier

    if quick:
        big = dict(vocab=32, seq=16, dim=32, depth=1, heads=2, batch=4)
        cnn_batch, lm = 8, dict(vocab=32, seq=16, dim=16, depth=1, heads=2, batch=4)
        imdb = dict(vocab=500, seq=32, batch=8)
    else:
        big = dict(vocab=256, seq=256, dim=512, depth=6, heads=8, batch=32)
        cnn_batch, lm = 128, dict(vocab=65, seq=64, dim=64, depth=2, heads=4, batch=32)
        imdb = dict(vocab=20000, seq=256, batch=64)

    def transformer(cfg: dict[str, int]) -> Callable[[], nn.Module]:
        return lambda: CharTransformer(
            cfg["vocab"], seq_len=cfg["seq"], dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"]
        )

    big_batch = _tokens(big["batch"], big["seq"], big["vocab"])
    return [
        Case(
            "fashion_mnist_cnn",
            lambda: ImageClassifier(10, width=16, hidden=64).net,
            _images(cnn_batch, 10),
            _cls_loss,
        ),
        Case(
            "shakespeare_transformer",
            transformer(lm),
            _tokens(lm["batch"], lm["seq"], lm["vocab"]),
            _lm_loss,
        ),
        Case(
            "imdb_bag_of_embeddings",
            lambda: BagOfEmbeddings(imdb["vocab"]),
            _reviews(imdb["batch"], imdb["seq"], imdb["vocab"]),
            _cls_loss,
        ),
        Case("transformer_512x6", transformer(big), big_batch, _lm_loss),
        Case("transformer_512x6_bf16", transformer(big), big_batch, _lm_loss, bf16=True),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- optimizers
def _soap(model: nn.Module) -> torch.optim.Optimizer:
    from pytorch_optimizer import SOAP

    return SOAP(model.parameters(), lr=3e-3)


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "SOAP": _soap,
    "KFAC": lambda m: lg.KFAC(m.parameters(), lr=0.01),
    "RING": lambda m: lg.RING(m.parameters(), lr=0.01),
    # issue 22: the eigen arithmetic fused by torch.compile (compiles in the warm-up round)
    "RING-compiled": lambda m: lg.RING(m.parameters(), lr=0.01, compile=True),
    # same-shaped blocks as one batch: off by default, as it measured no faster on a CPU
    "RING-batched": lambda m: lg.RING(m.parameters(), lr=0.01, batch_blocks=True),
    "RENG": lambda m: lg.RENG(m.parameters(), lr=0.01),
    "RKalman": lambda m: lg.RKalman(m.parameters(), lr=0.3),
}


class Runner:
    """One model copy and its optimizer; :meth:`step` is one full training step."""

    def __init__(self, name: str, case: Case, state: dict[str, Tensor], device: torch.device):
        self.name, self.case, self.device = name, case, device
        self.model = case.build().to(device)
        self.model.load_state_dict(state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallback notices (LayerNorm, embeddings)
            self.opt = OPTIMIZERS[name](self.model)
            if isinstance(self.opt, lg.GRNGOptimizer):
                lg.attach(self.model, self.opt)

    def step(self, x: Tensor, y: Tensor, counter: SyncCounter | None = None) -> None:
        self.opt.zero_grad()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.case.bf16)
        with autocast:
            loss = self.case.loss(self.model(x), y)
        if isinstance(self.opt, lg.RENG):
            lg.regularized_backward(loss, self.opt)
        else:
            loss.backward()
        if counter is None:
            self.opt.step()
        else:
            with counter:
                self.opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_and_syncs(
    case: Case, name: str, state: dict[str, Tensor], batches: list[Any], device: torch.device
) -> dict[str, Any]:
    """One optimizer alone: peak device memory over one round, and host syncs per step."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    runner = Runner(name, case, state, device)
    syncs = []
    for x, y in batches:
        counter = SyncCounter()
        runner.step(x, y, counter)
        syncs.append(counter.total)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    del runner
    return {"peak_mib": peak, "syncs_median": statistics.median(syncs), "syncs_max": max(syncs)}


def run_case(
    case: Case, names: list[str], device: torch.device, rounds: int, steps: int, warmup: int
) -> list[dict[str, Any]]:
    """Interleaved timing of every optimizer on one model, plus memory and syncs."""
    torch.manual_seed(0)
    state = case.build().state_dict()
    gen = torch.Generator().manual_seed(0)
    batches = [case.batch(gen, device) for _ in range(steps)]
    extra = {n: _peak_and_syncs(case, n, state, batches, device) for n in names}
    runners = [Runner(n, case, state, device) for n in names]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        for runner in runners if r % 2 == 0 else runners[::-1]:
            _sync(device)
            start = time.perf_counter()
            for x, y in batches:
                runner.step(x, y)
            _sync(device)
            if r >= warmup:
                times[runner.name].append((time.perf_counter() - start) / steps)
    median = {n: statistics.median(t) for n, t in times.items()}
    rows = []
    for n in names:
        row = {
            "model": case.name,
            "optimizer": n,
            "ms_per_step": round(1000 * median[n], 3),
            "vs_adamw": round(median[n] / median["AdamW"], 3) if "AdamW" in median else None,
            "vs_soap": round(median[n] / median["SOAP"], 3) if "SOAP" in median else None,
            **extra[n],
        }
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [f"# Device check: {header['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "device"]
    lines += [
        "",
        "| model | optimizer | ms/step | × AdamW | × SOAP | peak MiB | syncs/step (median/max) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['optimizer']} | failed: {r['error']} | | | | |")
            continue
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['ms_per_step']:.2f} | "
            f"{r['vs_adamw'] if r['vs_adamw'] is not None else 'n/a'} | "
            f"{r['vs_soap'] if r['vs_soap'] is not None else 'n/a'} | {peak} | "
            f"{r['syncs_median']:g}/{r['syncs_max']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--quick", action="store_true", help="tiny models (CPU smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default 20)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--models", default=None, help="comma-separated subset of the models")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 case")
    parser.add_argument("--optimizers", default=None, help="comma-separated subset")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (5 if args.quick else 20)
    names = args.optimizers.split(",") if args.optimizers else list(OPTIMIZERS)
    if args.quick and not args.optimizers:
        names.remove("RING-compiled")  # the smoke test stays seconds long
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {list(OPTIMIZERS)}")
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        names = [n for n in names if n != "SOAP"]
    selected = cases(args.quick)
    if args.models:
        wanted = set(args.models.split(","))
        selected = [c for c in selected if c.name in wanted]
    if args.no_bf16:
        selected = [c for c in selected if not c.bf16]
    header = {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "mode": "quick" if args.quick else "full",
        "timing": f"interleaved, median of {rounds} rounds x {steps} steps (1 warm-up round)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for case in selected:
        try:
            rows += run_case(case, names, device, rounds, steps, warmup=1)
        except Exception as err:  # report and go on: one failing model must not hide the rest
            rows.append({"model": case.name, "optimizer": "all", "error": repr(err)[:200]})
        print(f"{case.name}: done at {time.perf_counter() - started:.0f} s", flush=True)
    header["seconds"] = round(time.perf_counter() - started, 1)
    text = markdown(rows, header)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "device_check_" + re.sub(r"[^A-Za-z0-9]+", "_", header["device"]).strip("_").lower()
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
