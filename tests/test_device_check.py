"""The device check runs standalone on CPU in its tiny mode and reports what it promises."""

from __future__ import annotations

import json

import pytest

from benchmarks import device_check


def test_device_check_quick_runs_on_cpu(tmp_path):
    code = device_check.main(
        ["--out", str(tmp_path), "--quick", "--device", "cpu", "--rounds", "1", "--steps", "2",
         "--models", "fashion_mnist_cnn,transformer_512x6"]
    )  # fmt: skip
    assert code == 0
    (md,) = tmp_path.glob("device_check_cpu*.md")
    (js,) = tmp_path.glob("device_check_cpu*.json")
    report = json.loads(js.read_text())
    rows = report["rows"]
    assert {r["model"] for r in rows} == {"fashion_mnist_cnn", "transformer_512x6"}
    assert {"AdamW", "KFAC", "RING", "RENG", "RKalman"} <= {r["optimizer"] for r in rows}
    for r in rows:
        assert r["ms_per_step"] > 0 and r["vs_adamw"] > 0
        if r["optimizer"] not in ("AdamW", "SOAP"):
            assert r["syncs_max"] <= 1, r
    text = md.read_text()
    assert "| model | optimizer |" in text and report["header"]["device"] in text


def test_device_check_refuses_unknown_optimizers(tmp_path, capsys):
    with pytest.raises(SystemExit):
        device_check.main(["--out", str(tmp_path), "--quick", "--optimizers", "AdamW,Nope"])
    assert "unknown optimizers ['Nope']" in capsys.readouterr().err
