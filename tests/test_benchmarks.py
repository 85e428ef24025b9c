"""The benchmark pipeline, smoke-run on its ``tiny`` profile (generated data, a few steps), and
the pieces whose mistakes would silently bias a comparison: the schedule, the step protocol of
each optimizer, the time-to-target arithmetic. No timing is asserted."""

from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
import torch
from torch import nn

import lightning_grng as lg
from benchmarks import harness, report, suite
from benchmarks.optimizers import BY_NAME, SPECS, runs_on
from benchmarks.tasks import TASKS, lr_factor

NAMES = [spec.name for spec in SPECS]
ON = {task: [n for n in NAMES if runs_on(BY_NAME[n], task)] for task in TASKS}


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    suite.main(["--profile", "tiny", "--workers", "1", "--out", str(out)])
    return out


def test_tiny_suite_writes_every_phase_for_every_optimizer(tiny):
    runs = _rows(tiny / "runs.csv")
    assert {r["task"] for r in runs} == {t for t, task in TASKS.items() if task.in_benchmark}
    for task in (t for t, task in TASKS.items() if task.in_benchmark):
        for name in NAMES:
            mine = [r for r in runs if r["task"] == task and r["optimizer"] == name]
            if name not in ON[task]:
                assert mine == [], (task, name)
                continue
            phases = sorted(r["phase"] for r in mine)
            # A grid grows only past a best point on its edge; twins are never swept.
            assert phases.count("sweep") >= len(BY_NAME[name].lr_grid), (task, name)
            assert phases.count("final") == 1, (task, name)
            final = next(r for r in mine if r["phase"] == "final")
            assert int(final["steps"]) == TASKS[task].budgets["tiny"].steps
            for field in ("final_val", "final_test", "mean_grad_norm", "train_seconds"):
                assert math.isfinite(float(final[field])), (task, name, field)
    stability = [r for r in runs if r["phase"] == "stability"]
    assert len(stability) >= 3 * 3 * 3
    assert {r["optimizer"] for r in stability} == {"KFAC", "RING", "RENG"}
    reng = {"RENG-default", "RENG-default-rho0"}  # RENG skips the full Fashion-MNIST task
    assert {"SAM", *reng} == {n for n in NAMES if n not in ON["fashion_mnist"]} - {
        "Sophia",
        "SINGD",
    }
    assert all(reng <= set(ON[t]) for t in ("shakespeare", "imdb", "fashion_mnist_small"))
    assert "SAM" in ON["fashion_mnist_small"] and "Sophia" not in ON["fashion_mnist_small"]


def test_tiny_suite_generalization_task_reports_train_metric_and_sharpness(tiny):
    finals = [r for r in _rows(tiny / "runs.csv") if r["phase"] == "final"]
    for row in finals:
        # Measured on every generalization run whose loss stayed finite.
        measured = TASKS[row["task"]].generalization and math.isfinite(
            float(row["final_train_loss"])
        )
        for field in ("train_metric", "sharpness"):
            assert math.isfinite(float(row[field] or "nan")) == measured, (row["task"], field)
    text = (tiny / "report.md").read_text()
    assert "## Generalization: " in text and "## Ablation: ρ = 0 twins" in text


def test_twins_run_at_their_optimizers_chosen_rate_with_rho_zero(tiny):
    meta = json.loads((tiny / "meta.json").read_text())
    for task, chosen in meta["chosen_lr"].items():
        for twin in ("RING-rho0", "RENG-rho0", "RKalman-rho0"):
            assert chosen[twin] == chosen[BY_NAME[twin].twin_of], (task, twin)
    for twin in ("RING-rho0", "RENG-rho0", "RKalman-rho0"):
        opt = BY_NAME[twin].make(torch.nn.Linear(3, 2), 0.1).opt  # built and attached
        assert type(opt).__name__ == BY_NAME[twin].twin_of
        assert all(group["rho"] == 0.0 for group in opt.param_groups)


BENCHMARK_TASKS = [t for t, task in TASKS.items() if task.in_benchmark]


def test_tiny_suite_curves_timing_and_report(tiny):
    curves = _rows(tiny / "curves.csv")
    budget = TASKS["fashion_mnist"].budgets["tiny"]
    mine = [r for r in curves if r["task"] == "fashion_mnist" and r["optimizer"] == "RING"]
    assert [int(r["step"]) for r in mine] == [0, budget.steps // 2, budget.steps]
    assert float(mine[0]["seconds"]) == 0.0 < float(mine[-1]["seconds"])
    timing = _rows(tiny / "step_time.csv")
    expected = {(t, n) for t in BENCHMARK_TASKS for n in ON[t]}
    assert {(r["task"], r["optimizer"]) for r in timing} == expected
    assert all(float(r["ratio_to_adamw"]) == 1.0 for r in timing if r["optimizer"] == "AdamW")
    text = (tiny / "report.md").read_text()
    assert "Smoke run" in text
    for task in BENCHMARK_TASKS:
        assert TASKS[task].title in text
        assert (tiny / f"curves_{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in NAMES:
        # A ρ = 0 twin gets its own row in the generalization table; elsewhere its parent's
        # row of the GR table holds it.
        twin_elsewhere = BY_NAME[name].twin_of and name not in ON["fashion_mnist_small"]
        assert f"| {BY_NAME[name].twin_of if twin_elsewhere else name} |" in text
    for png in ("headline.png", "grad_norm.png", "stability.png"):
        assert (tiny / png).stat().st_size > 1000


def test_worker_processes_give_the_same_results_as_in_process(tmp_path):
    args = ["--profile", "tiny", "--tasks", "imdb", "--optimizers", "RING", "--seeds", "1"]
    suite.main([*args, "--workers", "1", "--out", str(tmp_path / "a")])
    suite.main([*args, "--workers", "2", "--out", str(tmp_path / "b")])

    def results(d):
        rows = _rows(d / "runs.csv")
        return sorted((r["phase"], r["optimizer"], r["lr"], r["final_val"]) for r in rows)

    assert results(tmp_path / "a") == results(tmp_path / "b")


def test_schedule_warms_up_then_decays_to_zero():
    total = 200
    factors = [lr_factor(s, total) for s in range(total + 1)]
    assert factors[0] == pytest.approx(0.1)
    peak = max(factors)
    assert peak == pytest.approx(1.0) and factors.index(peak) == 10
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[-1] == pytest.approx(0.0, abs=1e-12)


def test_sophia_builds_the_gradient_graph_only_when_it_refreshes_its_hessian():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = BY_NAME["Sophia"].make(model, 0.06)
    graphs = []
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for _ in range(21):
        graphs.append(opt._needs_graph())
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert [i for i, g in enumerate(graphs) if g] == [0, 10, 20]


def test_singd_composite_updates_every_parameter():
    """SINGD skips embeddings and LayerNorms; the benchmark's composite must not leave them
    frozen (that would hand SINGD a different model)."""
    torch.manual_seed(0)
    model = TASKS["shakespeare"].model(16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = BY_NAME["SINGD"].make(model, 1e-3)
    x = torch.randint(0, 16, (4, 8))
    opt.step(lambda: TASKS["shakespeare"].loss(model(x), x))
    frozen = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert frozen == []


def test_reported_gradient_norm_is_the_plain_gradient_norm_for_reng():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    plain = torch.linalg.vector_norm(
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
    )
    opt = BY_NAME["RENG"].make(model, 0.01)
    _, norm = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert norm == pytest.approx(float(plain), rel=1e-5)


def _fake_results(tmp_path, adamw, ring, kfac=None):
    """Two optimizers (three with ``kfac``), one accuracy task; curves as
    {seed: [(step, seconds, test)]}."""
    families = {"AdamW": "baseline", "RING": "grng", "KFAC": "kfac"}
    meta = {"profile": "tiny", "tasks": {"t": {"title": "T", "metric": "accuracy",
            "higher_is_better": True}}, "optimizers": {
            name: {"family": family} for name, family in families.items()}}  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    runs, points = [], []
    given = {"AdamW": adamw, "RING": ring, "KFAC": kfac}
    for name, curves in ((n, c) for n, c in given.items() if c is not None):
        for seed, curve in curves.items():
            runs.append(dict.fromkeys(suite.RUN_FIELDS, "nan") | dict(
                phase="final", task="t", optimizer=name, seed=seed, diverged="False",
                final_test=curve[-1][2], damping=""))  # fmt: skip
            points += [dict(task="t", optimizer=name, seed=seed, step=s, seconds=t, train_loss=1,
                            val_metric=a, test_metric=a) for s, t, a in curve]  # fmt: skip
    suite._write_csv(tmp_path / "runs.csv", suite.RUN_FIELDS, runs)
    suite._write_csv(tmp_path / "curves.csv", suite.CURVE_FIELDS, points)
    return report.Results.load(tmp_path)


def test_time_to_target_is_paired_by_seed(tmp_path):
    adamw = {0: [(0, 0, 0.1), (5, 10, 0.80), (10, 20, 0.85)],
             1: [(0, 0, 0.1), (5, 10, 0.86), (10, 20, 0.84)]}  # fmt: skip
    ring = {0: [(0, 0, 0.1), (5, 6, 0.85), (10, 12, 0.9)],
            1: [(0, 0, 0.1), (5, 6, 0.80), (10, 12, 0.83)]}  # fmt: skip
    res = _fake_results(tmp_path, adamw, ring)
    # Seed 0: AdamW reaches its 0.85 at 20 s, RING at 6 s. Seed 1: AdamW reaches 0.84 at 10 s
    # (an earlier point was higher), RING never does.
    ratio, reached, total = report.target_ratio(res, "t", "RING", "seconds", "AdamW")
    assert (ratio, reached, total) == (pytest.approx(6 / 20), 1, 2)
    assert report.target_ratio(res, "t", "AdamW", "step", "AdamW") == (1.0, 2, 2)
    assert res.best_baseline("t") == "AdamW"  # RING is this project's, never the reference


def test_who_wins_names_a_winner_from_its_own_columns(tmp_path):
    """A ρ = 0 KFAC that beats the best GRNG variant is named in its own column, and the winner
    is always one of the three named optimizers."""
    res = _fake_results(
        tmp_path,
        adamw={0: [(10, 1, 0.85)]},
        ring={0: [(10, 1, 0.86)]},
        kfac={0: [(10, 1, 0.88)]},
    )
    row = report.winners_table(res)[-2]  # the table ends with a blank line
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["AdamW 85.00", "RING 86.00", "KFAC 88.00", "**KFAC**"]


def test_resume_reruns_only_the_missing_runs(tmp_path):
    args = ["--profile", "tiny", "--tasks", "imdb", "--optimizers", "RING", "--workers", "1",
            "--out", str(tmp_path)]  # fmt: skip
    suite.main(args)
    complete = _rows(tmp_path / "runs.csv")
    curves = _rows(tmp_path / "curves.csv")
    # An interruption, or a phase deliberately rerun: one sweep run is missing, the final
    # runs (which come later) are all there.
    missing = next(r for r in complete if r["phase"] == "sweep")
    kept = [r for r in complete if r is not missing]
    suite._write_csv(tmp_path / "runs.csv", suite.RUN_FIELDS, kept)
    suite.main([*args, "--resume"])
    resumed = _rows(tmp_path / "runs.csv")
    key = ("phase", "optimizer", "lr", "seed")
    assert sorted(tuple(r[k] for k in key) for r in resumed) == sorted(
        tuple(r[k] for k in key) for r in complete
    )
    for row in kept:  # reused as they were, not rerun (a rerun would time differently)
        again = next(r for r in resumed if all(r[k] == row[k] for k in key))
        assert again["train_seconds"] == row["train_seconds"]
    points = sorted(tuple(r.values()) for r in _rows(tmp_path / "curves.csv"))
    assert points == sorted(tuple(r.values()) for r in curves)


def test_a_resumed_run_never_writes_fewer_finished_runs_than_it_started_with(tmp_path, monkeypatch):
    """Every save of a resumed run keeps the previous attempt's runs that it has not reached
    yet, so an interruption during the resumed sweep cannot lose the earlier final runs."""
    args = ["--profile", "tiny", "--tasks", "imdb", "--optimizers", "RING", "--workers", "1",
            "--out", str(tmp_path)]  # fmt: skip
    suite.main(args)
    complete = _rows(tmp_path / "runs.csv")
    missing = next(r for r in complete if r["phase"] == "sweep")
    suite._write_csv(
        tmp_path / "runs.csv", suite.RUN_FIELDS, [r for r in complete if r is not missing]
    )
    finals = sum(r["phase"] == "final" for r in complete)
    written = []
    original = suite._write_csv

    def recording(path, fields, rows):
        if path.name == "runs.csv":
            written.append(sum(r["phase"] == "final" for r in rows))
        original(path, fields, rows)

    monkeypatch.setattr(suite, "_write_csv", recording)
    suite.main([*args, "--resume"])
    assert written and all(n == finals for n in written)


def test_learning_rate_choice_ignores_failed_runs_and_respects_the_metric_direction():
    def row(task, lr, val, failed=False):
        return dict(task=task, optimizer="RING", lr=lr, final_val=val, diverged=failed)

    rows = [row("fashion_mnist", 0.01, 0.80), row("fashion_mnist", 0.03, 0.85),
            row("fashion_mnist", 0.1, 0.90, failed=True),  # better number, but it failed
            row("shakespeare", 0.01, 2.0), row("shakespeare", 0.03, 2.5)]  # fmt: skip
    # 0.03 is inside the grid that was run (0.1 above it failed, but it was tried).
    assert suite._chosen(rows, "fashion_mnist", "RING") == (0.03, 0)
    # A loss: lower is better; 0.01 is the lowest rate tried, so it sits on the lower edge.
    assert suite._chosen(rows, "shakespeare", "RING") == (0.01, -1)
    grid = BY_NAME["RING"].lr_grid
    assert suite._chosen(rows, "imdb", "RING") == (grid[len(grid) // 2], 0)  # nothing usable


def test_a_best_point_on_an_edge_extends_the_grid_by_one_x3_step():
    def row(lr, val):
        return dict(task="fashion_mnist", optimizer="AdamW", lr=lr, final_val=val, diverged=False)

    rows = [row(lr, v) for lr, v in ((3e-4, 0.7), (1e-3, 0.76), (3e-3, 0.8), (1e-2, 0.85))]
    best, side = suite._chosen(rows, "fashion_mnist", "AdamW")
    assert (best, side) == (1e-2, 1) and suite._extended(best, side) == 0.03
    rows.append(row(0.03, 0.86))
    assert suite._chosen(rows, "fashion_mnist", "AdamW") == (0.03, 1)
    rows.append(row(0.09, 0.84))
    assert suite._chosen(rows, "fashion_mnist", "AdamW") == (0.03, 0)  # inside now
    assert suite._extended(0.3, -1) == 0.1


def test_damping_grid_grows_past_an_edge_best_cell_and_reuses_the_sweep_column():
    def cell(name, damping, lr, val):
        return dict(phase="stability", task="fashion_mnist", optimizer=name, damping=damping,
                    lr=lr, final_val=val, diverged=False)  # fmt: skip

    dampings = [0.01, 0.1, 1.0]
    rows = [cell("KFAC", d, lr, 0.8 + (d == 0.1) * lr) for d in dampings for lr in (0.03, 0.1)]
    rows.append(cell("RING", 1.0, 0.3, 0.9))  # RING's best cell: the largest damping
    jobs = suite._damping_extension(rows, "full", ["fashion_mnist"], ["KFAC", "RING"], dampings)
    assert dampings == [0.01, 0.1, 1.0, 3.0]
    assert {(j.optimizer, j.damping, j.lr) for j in jobs} == {
        (n, 3.0, lr) for n in ("KFAC", "RING") for lr in (0.03, 0.1, 0.3)
    }
    for cls in (lg.KFAC, lg.RING, lg.RENG):  # the stability grid runs the K-FAC route
        assert (
            cls(nn.Linear(2, 2).parameters(), preconditioner="kfac").defaults["damping"]
            == suite.DEFAULT_DAMPING
        )
    sweep = [dict(phase="sweep", task="fashion_mnist", optimizer="RING", lr=0.1, final_val=0.85)]
    stab = suite._stability_jobs("full", ["fashion_mnist"], ["RING"], [suite.DEFAULT_DAMPING])
    cells = suite._default_damping_cells(sweep, stab)
    assert [(c["phase"], c["lr"], c["damping"], c["final_val"]) for c in cells] == [
        ("stability", 0.1, suite.DEFAULT_DAMPING, 0.85)
    ]


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    torch.manual_seed(0)
    model = TASKS["shakespeare"].model(16)
    opt = BY_NAME["Muon"].make(model, 0.03).opt
    muon, adamw = (g for g in opt.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = sorted(names[id(p)] for p in muon["params"])
    assert hidden and all(".attn." in n or ".mlp." in n for n in hidden)
    assert all(n.endswith("weight") for n in hidden)
    rest = {names[id(p)] for p in adamw["params"]}
    assert {"tok.weight", "head.weight", "pos"} <= rest
    assert adamw["lr"] == pytest.approx(0.03 / 3) and muon["lr"] == 0.03
    cnn = TASKS["fashion_mnist"].model(10)
    muon = BY_NAME["Muon"].make(cnn, 0.03).opt.param_groups[0]["params"]
    assert {p.ndim for p in muon} == {4, 2} and all(p is not cnn[-1].weight for p in muon)


@pytest.mark.parametrize("name", ["SAM", "SAM-KFAC"])
def test_sam_takes_two_gradients_per_step_on_the_same_batch(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    opt = BY_NAME[name].make(model, 0.1)
    if name == "SAM-KFAC":  # the base KFAC is attached: its block preconditions the step
        assert opt.opt.base_optimizer.attached and "0" in opt.opt.base_optimizer.blocks
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    calls = []

    def loss_of():
        calls.append(1)
        return torch.nn.functional.cross_entropy(model(x), y)

    before = model[0].weight.detach().clone()
    loss, norm = opt.step(loss_of)
    assert len(calls) == 2 and math.isfinite(loss) and norm > 0
    assert not torch.equal(before, model[0].weight)


def test_sharpness_is_the_top_eigenvalue_of_the_dense_hessian():
    """Power iteration on Hessian-vector products against eigvalsh of the dense Hessian of a
    small softmax regression (float64; its Hessian is PSD, so the top eigenvalue dominates)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    loss_fn = torch.nn.functional.cross_entropy
    estimate = harness.top_hessian_eigenvalue(
        model, loss_fn, torch.utils.data.TensorDataset(x, y), iters=300
    )
    w, b = model.weight.detach(), model.bias.detach()

    def loss_of(flat):
        return loss_fn(x @ flat[:15].view(3, 5).T + flat[15:], y)

    dense = torch.autograd.functional.hessian(loss_of, torch.cat([w.flatten(), b]))
    assert estimate == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)


def test_state_size_counts_singds_structured_factors():
    """SINGD keeps its K and C factors as structured-matrix objects in its state dict; they
    must be counted, not only the momentum buffers."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = BY_NAME["SINGD"].make(model, 0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    momentum = sum(p.numel() for p in model.parameters()) * 4
    factors = (5 * 5 + 2 * 2) * 4  # K over the 4 inputs + bias, C over the 2 outputs (float32)
    assert opt.state_bytes() >= momentum + factors


@pytest.mark.parametrize("preset", ["reng_routes", "eigen_schedule"])
def test_variants_script_writes_its_tables(tmp_path, preset):
    from benchmarks import variants

    out = tmp_path / f"{preset}.md"
    args = ["--preset", preset, "--task", "shakespeare", "--profile", "tiny", "--rounds", "2"]
    variants.main([*args, "--out", str(out)])
    text = out.read_text()
    for name in variants.PRESETS[preset]:
        assert text.count(f"| {name} |") == 2  # a timing row and a quality row
    assert "| AdamW |" in text


def test_symmetric_label_noise_moves_a_seeded_share_to_another_class():
    from benchmarks.tasks import symmetric_noise

    labels = torch.arange(10).repeat(1000)
    noisy = symmetric_noise(labels, 0.4, 10)
    changed = noisy != labels
    assert 0.38 < float(changed.float().mean()) < 0.42
    assert torch.equal(noisy, symmetric_noise(labels, 0.4, 10))  # the same for every run
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9
    # Every wrong class about equally likely: 1/9 of the flips each.
    counts = torch.bincount((noisy[changed] - labels[changed]) % 10, minlength=10)
    assert counts[0] == 0 and float(counts[1:].min()) > 0.8 * float(counts[1:].max())


def test_gr_study_effect_is_the_paired_difference_over_common_seeds():
    from benchmarks.gr_study import paired

    mean, std, n = paired({0: 80.0, 1: 82.0, 2: 81.0}, {0: 79.0, 1: 80.0, 3: 50.0})
    assert (mean, n) == (1.5, 2) and std == pytest.approx(0.7071, rel=1e-3)


def _sweep_row(lr: float, test: float, diverged: bool = False) -> dict:
    return dict(phase="sweep", lr=lr, final_test=test, final_val=test, diverged=diverged)


def test_lr_robustness_width_is_the_contiguous_range_within_tolerance_of_the_best():
    from benchmarks.lr_robustness import lr_range

    rows = [
        _sweep_row(0.001, 0.80),
        _sweep_row(0.003, 0.846),  # within 0.5 points of 0.85
        _sweep_row(0.01, 0.85),
        _sweep_row(0.03, 0.849),
        _sweep_row(0.1, 0.70),
        _sweep_row(0.3, 0.849, diverged=True),  # failed: never inside the range
    ]
    found = lr_range(rows, higher=True, tolerance=0.005)
    assert (found["best_lr"], found["lo"], found["hi"]) == (0.01, 0.003, 0.03)
    assert found["width"] == pytest.approx(1.0)
    assert not found["open_lo"] and not found["open_hi"]
    # Loss: lower is better; the best on the lowest lr leaves the range open there.
    loss = lr_range(
        [_sweep_row(0.01, 1.80), _sweep_row(0.03, 1.81), _sweep_row(0.1, 1.9)], False, 0.02
    )
    assert (loss["best_lr"], loss["hi"], loss["open_lo"]) == (0.01, 0.03, True)
    assert lr_range([_sweep_row(0.01, 0.1, diverged=True)], True, 0.005) is None


def test_lr_robustness_grows_the_grid_where_the_range_reaches_an_edge():
    from benchmarks import lr_robustness
    from benchmarks.optimizers import EIGEN_GRID

    task, name = "fashion_mnist_small", "RING-default"
    inside = [dict(_sweep_row(lr, 0.80), task=task, optimizer=name) for lr in EIGEN_GRID]
    inside[1]["final_test"] = 0.85  # interior best, neighbours far below: nothing to add
    assert lr_range_extensions(lr_robustness, inside, task, name) == []
    edge = [dict(r, final_test=0.85 - 0.001 * i) for i, r in enumerate(inside)]  # all within
    more = lr_range_extensions(lr_robustness, edge, task, name)
    assert sorted(lr for *_, lr in more) == [0.001, 0.3]  # one ×3 step beyond both edges
    # At most MAX_EXTENSIONS steps per side.
    far = edge + [
        dict(_sweep_row(lr, 0.85), task=task, optimizer=name) for lr in (1e-3, 3e-4, 1e-4)
    ]
    assert sorted(lr for *_, lr in lr_range_extensions(lr_robustness, far, task, name)) == [0.3]


def lr_range_extensions(module, rows, task, name):
    return module._extensions(rows, [(task, name)])


def test_gr_study_regimes_name_known_optimizers_once_each():
    from benchmarks.gr_study import REGIMES, ROUTES
    from benchmarks.optimizers import BY_NAME
    from benchmarks.tasks import TASKS

    for regime, names in REGIMES.items():
        assert (
            regime in TASKS and not TASKS[regime].in_benchmark
        ) or regime == "fashion_mnist_small"
        assert len(set(names)) == len(names) and set(names) <= set(BY_NAME)
    for names in ROUTES.values():
        assert set(names.values()) <= set(BY_NAME) and BY_NAME[names[0.0]].twin_of


def test_large_batch_task_is_the_small_task_at_eight_times_the_batch():
    from benchmarks.tasks import TASKS

    small, large = TASKS["fashion_mnist_small"], TASKS["fashion_mnist_large_batch"]
    assert large.batch_size == 8 * small.batch_size
    epochs = [
        t.budgets["full"].steps * t.batch_size / t.budgets["full"].subset for t in (small, large)
    ]
    assert epochs[1] == pytest.approx(epochs[0], rel=0.02)  # same epochs, 8× fewer steps


def test_gr_study_extends_a_sam_radius_grid_whose_best_is_on_an_edge():
    from benchmarks.gr_study import radius_extensions

    def finals(*accs):
        return {s: dict(final_test=a / 100, diverged="False") for s, a in enumerate(accs)}

    runs = {
        "SAM-AdamW": finals(82, 82.2),  # radius 0.05 best, the lower edge: add 0.02
        "SAM-AdamW-r0.2": finals(78, 79),
        "SAM-KFAC": finals(60, 61),
        "SAM-KFAC-r0.2": finals(70, 71),  # the upper edge: add 0.5
        "SAM-KFAC-r0.5": finals(65, 66),  # … already there and worse: 0.2 is interior now
    }
    assert radius_extensions(runs) == ["SAM-AdamW-r0.02"]
    del runs["SAM-KFAC-r0.5"]
    assert radius_extensions(runs) == ["SAM-AdamW-r0.02", "SAM-KFAC-r0.5"]


def test_suite_without_step_time_keeps_quality_runs_and_writes_no_timing(tmp_path):
    """The GR study's suite calls (--no-step-time) on a large-batch task of the tiny profile."""
    out = tmp_path / "gr"
    args = ["--profile", "tiny", "--workers", "1", "--tasks", "fashion_mnist_large_batch"]
    suite.main([*args, "--optimizers", "RING-default", "--out", str(out), "--no-step-time"])
    assert not (out / "step_time.csv").exists() and (out / "report.md").exists()
    assert {r["optimizer"] for r in _rows(out / "runs.csv") if r["phase"] == "final"} == {
        "AdamW",
        "RING-default",
    }
