"""The LightningCLI and the kill-and-resume run, as real subprocesses (as a user runs them)."""

from __future__ import annotations

import inspect
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_grng as lg
from lightning_grng.optim.arguments import DESCRIPTIONS

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--model", "examples.models.ImageClassifier", "--model.width", "4", "--model.hidden", "16",
    "--data", "examples.data.synthetic.RandomImagesDataModule", "--data.num_samples", "128",
    "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "examples.train", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _metrics_header(root: Path) -> str:
    return (root / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("name", ["RING", "RKalman"])
def test_cli_optimizer_shorthand(tmp_path, name):
    run = _cli(
        "fit", *SMALL, "--trainer.default_root_dir", str(tmp_path),
        "--optimizer", f"grng.{name}", "--optimizer.rho", "0.1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "grng/damping" in _metrics_header(tmp_path)
    config = (tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert f"class_path: grng.{name}" in config and "rho: 0.1" in config


def test_cli_yaml_class_path_with_strategy_from_yaml(tmp_path):
    cfg = tmp_path / "reng.yaml"
    cfg.write_text(
        "optimizer:\n  class_path: lightning_grng.RENG\n  init_args:\n    rho: 0.2\n"
        "trainer:\n  strategy:\n    class_path: lightning_grng.GRNGStrategy\n"
    )
    run = _cli("fit", *SMALL, "--trainer.default_root_dir", str(tmp_path), "--config", str(cfg))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "extra local backward" not in run.stderr + run.stdout
    assert "grng/grad_norm" in _metrics_header(tmp_path)


def test_cli_full_class_path_without_strategy_falls_back_and_says_so(tmp_path):
    run = _cli(
        "fit", *SMALL, "--trainer.default_root_dir", str(tmp_path),
        "--optimizer", "lightning_grng.RENG",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "extra local backward" in run.stderr + run.stdout


@pytest.mark.parametrize("name", ["KFAC", "RING", "RENG", "RKalman"])
def test_cli_optimizer_help_lists_every_argument_in_plain_text(name):
    """Every constructor argument with its default and a description, and no reST markup."""
    run = _cli("fit", "--optimizer.help", f"grng.{name}")
    assert run.returncode == 0, run.stderr[-3000:]
    text = " ".join(run.stdout.split())  # argparse wraps lines
    params = inspect.signature(getattr(lg, name).__init__).parameters
    for arg in (a for a in params if a not in ("self", "params")):
        assert f"--optimizer.{arg} " in run.stdout, arg
        assert DESCRIPTIONS.get(arg, "")[:30] in text or arg in getattr(
            getattr(lg, name), "ARGUMENTS", {}
        )
    assert "default: 0.02" in text or name == "RKalman"
    for markup in ("``", ":class:", ":meth:", ":func:"):
        assert markup not in run.stdout, markup
    if name == "RING":
        assert "gradient-regularization strength" in text and "Adam's units" in text


def test_cli_invalid_hyperparameter_is_one_clear_message(tmp_path):
    run = _cli(
        "fit", *SMALL, "--trainer.default_root_dir", str(tmp_path),
        "--optimizer", "grng.RING", "--optimizer.rho", "-1",
    )  # fmt: skip
    assert run.returncode != 0
    assert "RING: invalid rho=-1.0; allowed: [0.0, inf)" in run.stderr


def _script(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "kill_resume.py"), "--out", str(out),
         *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path):
    straight = _script(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # 8 steps per epoch: step 12 is the middle of the second epoch.
    killed = _script(tmp_path / "killed", "--kill-at-step", "12")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final.pt").exists()
    resumed = _script(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("missing", ["fashion-mnist"])
def test_missing_dataset_names_the_fetch_command(tmp_path, missing):
    run = _cli(
        "fit", "--config", "examples/configs/fashion_mnist.yaml",
        "--data.data_dir", str(tmp_path), "--optimizer", "grng.RING",
        "--trainer.default_root_dir", str(tmp_path),
    )  # fmt: skip
    assert run.returncode != 0
    assert f"python -m examples.data.fetch {missing}" in run.stderr
