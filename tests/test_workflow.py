"""The research workflow around runs: sweep definitions, offline sweeps, comparison, reproduction."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, cli_env, run_cli, run_main
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from PIL import Image
from scipy import stats

from diffexp.config import CONFIG_PATH
from diffexp.report.stats import smooth
from diffexp.sweep import combinations, load_definition, schema_violations

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
CONF = Path(CONFIG_PATH)
# The sweeps measure metric=digits, which comes with the metrics work; until it is merged here the
# offline sweeps below measure nothing.
NO_METRIC = [] if (CONF / "metric" / "digits.yaml").exists() else ["metric=none"]


def rows(run_dir: Path) -> list[dict]:
    """The training rows of metrics.jsonl, read directly (not through diffexp), to check diffexp's numbers against."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


# ---------------------------------------------------------------------------- sweep definitions
def test_the_three_sweeps_exist():
    assert {p.stem for p in SWEEPS} >= {"unet_sizes", "noise_schedules", "lr_search"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_definition_passes_wandb_validation(path):
    definition = load_definition(path)
    assert schema_violations(definition) == []
    # The W&B agent runs `command` as is: our train module with Hydra-style key=value arguments.
    assert definition["command"][:4] == ["${env}", "${interpreter}", "-m", "diffexp.train"]
    assert "${args_no_hyphens}" in definition["command"]
    assert f"group={definition['name']}" in definition["command"]


def test_wandb_validation_rejects_a_broken_definition(tmp_path):
    definition = load_definition(REPO / "sweeps" / "lr_search.yaml")
    definition["method"] = "grid_search"
    definition["parameters"]["trainer.lr"] = {"distribution": "log_uniform_values", "min": 1e-2, "max": 1e-4}
    problems = schema_violations(definition)
    assert any("grid_search" in p for p in problems) and any("trainer.lr: min" in p for p in problems)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(definition))
    proc = run_main("sweep", str(bad), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a valid W&B sweep definition" in proc.stderr


@pytest.mark.skipif(not os.environ.get("DIFFEXP_SWEEPS_PYTHON"),
                    reason="set DIFFEXP_SWEEPS_PYTHON to a Python with W&B's `sweeps` package (it pins numpy<2)")
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_definition_passes_the_sweeps_package_itself(path):
    code = ("import sys, yaml; from sweeps.config import schema_violations_from_proposed_config as v; "
            "print(v(yaml.safe_load(open(sys.argv[1]))))")
    out = subprocess.run([os.environ["DIFFEXP_SWEEPS_PYTHON"], "-c", code, str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_combination_of_a_sweep_composes(path):
    definition = load_definition(path)
    if "metric" in definition["parameters"]:
        option = definition["parameters"]["metric"]["value"]
        if not (CONF / "metric" / f"{option}.yaml").exists():
            pytest.xfail(f"conf/metric/{option}.yaml comes with the metrics work, not merged on this branch")
    combos = combinations(definition)
    assert len(combos) == np.prod([len(s.get("values", [s.get("value")])) if "min" not in s else 2
                                   for s in definition["parameters"].values()])
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        for overrides in combos:
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # so ${hydra:runtime.choices...} in name resolves
            for key in cfg:  # every value resolves
                if key != "hydra":
                    OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
            for override in overrides:
                key, value = override.split("=", 1)
                if (CONF / key).is_dir() or key == "name":
                    continue  # a group choice: compose() already failed if the option did not exist; a
                    # name template resolves to the run's name (test_sweep_run_names_carry_the_swept_values)
                assert str(OmegaConf.select(cfg, key)) == value, override
    # What the W&B agent would run for the first combination, as a user would check it.
    proc = run_main("train", *combos[0], "--cfg", "job", check=True)
    assert f"group: {definition['name']}" in proc.stdout


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_run_names_carry_the_swept_values(path):
    definition = load_definition(path)
    swept = [k for k, spec in definition["parameters"].items() if "value" not in spec]
    names = []
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        for overrides in combinations(definition):  # what the W&B agent passes, key=str(value)
            # The metric group does not enter the name (and conf/metric/digits.yaml may not be here yet).
            cfg = compose(config_name="train", overrides=[o for o in overrides if not o.startswith("metric")],
                          return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            name = cfg.name
            values = dict(o.split("=", 1) for o in overrides)
            assert all(values[k] in name for k in swept), (name, overrides)
            assert re.fullmatch(r"[\w.+-]{1,80}", name), name  # one short path component
            names.append(name)
    assert len(set(names)) == len(names)  # no two runs of the sweep share a name


# ---------------------------------------------------------------------------- offline sweep
@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """unet_sizes.yaml narrowed to two models x two seeds, tiny, run offline and logged to W&B (the
    default logger; offline here): its sweep directory."""
    base = tmp_path_factory.mktemp("sweep")
    sweep_dir = base / "unet_sizes"
    proc = run_cli("sweep", "sweeps/unet_sizes.yaml", "model=unet_tiny,unet_small", "seed=0,1", "debug=tiny",
                   "trainer.max_steps=3", "trainer.log_every=1", *NO_METRIC, f"cache_dir={base / 'cache'}",
                   f"hydra.sweep.dir={sweep_dir}")
    return sweep_dir, proc


@pytest.mark.slow
def test_sweep_runs_a_grid_offline_as_one_multirun(grid_sweep):
    sweep_dir, proc = grid_sweep
    assert "diffexp.train -m group=unet_sizes" in proc.stdout
    runs = sorted(p.parent for p in sweep_dir.glob("*/run.json"))
    assert len(runs) == 4
    seen = set()
    for run in runs:
        cfg = OmegaConf.load(run / "config.yaml")
        info = json.loads((run / "run.json").read_text())
        assert info["status"] == "finished" and cfg.group == "unet_sizes"
        assert cfg.dataset.name == "digits" and cfg.trainer.max_steps == 3
        assert [r["step"] for r in rows(run)] == [1, 2, 3]
        seen.add((cfg.choices.model, cfg.seed))
    assert seen == {("unet_tiny", 0), ("unet_tiny", 1), ("unet_small", 0), ("unet_small", 1)}
    assert (sweep_dir / "multirun.yaml").is_file()  # Hydra's record of the multirun


@pytest.mark.slow
def test_bayes_sweep_offline_samples_at_random_through_submitit_local(tmp_path, cache_dir):
    sweep_dir = tmp_path / "lr"
    proc = run_cli("sweep", "sweeps/lr_search.yaml", "runs=2", "sample_seed=3", "hydra/launcher=submitit_local",
                   "metric=none", "trainer.eval_every=0", "debug=tiny", "logger=none",
                   f"cache_dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}")
    assert "samples the same space at random" in proc.stdout  # said plainly: no Bayesian search offline
    # debug=tiny wins over the sweep's own 3000 steps and unet_small, and says so.
    assert "note: debug=tiny replaces the sweep's fixed model=unet_small, trainer.max_steps=3000" in proc.stdout
    runs = sorted(p.parent for p in sweep_dir.glob("*/run.json"))
    assert len(runs) == 2
    lrs = set()
    for run in runs:
        cfg = OmegaConf.load(run / "config.yaml")
        assert json.loads((run / "run.json").read_text())["status"] == "finished"
        assert cfg.trainer.max_steps == 4 and cfg.choices.model == "unet_tiny"
        assert 1e-4 <= cfg.trainer.lr <= 3e-3 and cfg.trainer.ema.decay in (0.999, 0.9995, 0.9999)
        assert cfg.group == "lr_search" and cfg.metric.name == "none"
        assert cfg.name == f"unet_tiny-lr{cfg.trainer.lr}-ema{cfg.trainer.ema.decay}-s0"  # the draws, by name
        lrs.add(cfg.trainer.lr)
    assert len(lrs) == 2
    assert list((sweep_dir / ".submitit").iterdir())  # submitit's local executor ran the jobs
    # compare groups the draws by the values drawn, not by their opaque sweep_trial number.
    proc = run_main("compare", str(sweep_dir), f"out={tmp_path / 'report'}", check=True)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert "trainer.lr" in summary["axes"] and "sweep_trial" not in summary["axes"]
    assert "trainer.optimizer.lr" not in summary["axes"] and "warning" not in proc.stderr  # lr's interpolated copy
    assert sorted(r["axes"]["trainer.lr"] for r in summary["runs"]) == sorted(lrs)


# ---------------------------------------------------------------------------- compare
def copy_runs(runs: list[Path], dest: Path) -> list[Path]:
    """Copies of run directories under ``dest`` (links kept as links, as W&B made them)."""
    return [Path(shutil.copytree(r, dest / r.name, symlinks=True)) for r in runs]


def add_quality(run: Path, values: dict[str, list[float]]) -> None:
    """Log quality metrics into a run's metrics.jsonl as training's evaluation does, one row per
    evaluation at the run's last logged steps (the digits metric itself is tested where it is built)."""
    n = len(next(iter(values.values())))
    with (run / "metrics.jsonl").open("a") as f:
        for i, step in enumerate([r["step"] for r in rows(run)][-n:]):
            f.write(json.dumps({"step": step, **{k: v[i] for k, v in values.items()}, "eval/seconds": 1.5}) + "\n")


def test_smoothing_is_the_debiased_exponential_moving_average():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards zero at the start
    assert smooth([0.0, 10.0], 0.5) == pytest.approx([0.0, 5 / 0.75])
    assert smooth([3.0, 1.0], 0.0) == [3.0, 1.0]


@pytest.mark.slow
def test_compare_reports_runs_and_seed_intervals_from_their_records(grid_sweep, tmp_path):
    sweep_dir, _ = grid_sweep
    # Every run is W&B-logged: wandb/offline-run-*/files/ links back to config.yaml and run.json.
    assert len(list(sweep_dir.glob("*/wandb/offline-run-*/files/run.json"))) == 4
    out = tmp_path / "report"
    proc = run_main("compare", str(sweep_dir), "by=model", f"out={out}", check=True)
    assert "compared 4 runs in 2 groups by model" in proc.stdout  # each run once
    assert "warning" not in proc.stderr and "skipped" not in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    md = (out / "report.md").read_text()
    by_model: dict[str, list[float]] = {}
    for run in sorted(p.parent for p in sweep_dir.glob("*/run.json")):
        cfg = OmegaConf.load(run / "config.yaml")
        final = rows(run)[-1]["train/loss"]
        by_model.setdefault(cfg.choices.model, []).append(final)
        row = next(r for r in summary["runs"] if r["run"] == str(run.resolve()))
        assert row["final_loss"] == final and row["steps"] == 3 and row["axes"] == {"model": cfg.choices.model}
        assert row["num_parameters"] == json.loads((run / "run.json").read_text())["num_parameters"]
        assert f"| {cfg.name} | {cfg.choices.model} | {cfg.seed} |" in md
    for model, finals in by_model.items():
        group = next(g for g in summary["groups"] if g["axes"] == [model])
        low, high = stats.t.interval(0.95, len(finals) - 1, loc=np.mean(finals), scale=stats.sem(finals))
        assert group["n"] == 2
        assert group["final_loss"]["mean"] == pytest.approx(np.mean(finals), rel=1e-12)
        assert group["final_loss"]["ci95"] == pytest.approx((high - low) / 2, rel=1e-9)
        assert f"{np.mean(finals):.4g} ± {(high - low) / 2:.4g}" in md
    for png in ("loss.png", "grids.png"):
        assert Image.open(out / png).size[0] > 100
        assert f"({png})" in md
    assert "Training loss (smoothed 0.9; faint: raw)" in md
    assert sorted(summary["grid_titles"]) == sorted(f"model={m}, seed {s}\nstep 0000003"
                                                    for m in ("unet_tiny", "unet_small") for s in (0, 1))
    html = (out / "report.html").read_text()
    assert "<table>" in html and "loss.png" in html and "unet_small" in html


@pytest.mark.slow
def test_wandb_sync_lists_each_run_once(grid_sweep):
    sweep_dir, _ = grid_sweep
    run = sorted(p.parent for p in sweep_dir.glob("*/run.json"))[0]
    assert not (run / "wandb" / "latest-run").exists()  # removed when the run closed
    proc = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run"], cwd=run,
                          env=cli_env(WANDB_SILENT="false"), capture_output=True, text=True, timeout=120, check=True)
    listed = [line.split()[-1] for line in (proc.stdout + proc.stderr).splitlines() if line.strip().endswith(".wandb")]
    assert len(listed) == 1 and listed[0].startswith("wandb/offline-run-"), proc.stdout + proc.stderr


@pytest.mark.slow
def test_compare_ranks_groups_by_sample_quality(grid_sweep, train, tmp_path):
    sweep_dir, _ = grid_sweep
    runs = copy_runs(sorted(p.parent for p in sweep_dir.glob("*/run.json")), tmp_path / "runs")
    fd = {}
    for i, run in enumerate(runs):  # unet_small scores the lower (better) distance
        small = OmegaConf.load(run / "config.yaml").choices.model == "unet_small"
        fd[run] = [40.0 - 10 * small + i, 30.0 - 12 * small + i]
        add_quality(run, {"eval/fd_digits_1k": fd[run], "eval/cs_digits_1k": [2.0 + small, 3.0 - small]})
    out = tmp_path / "report"
    proc = run_main("compare", *map(str, runs), "by=model", f"out={out}", check=True)
    assert "ranked by eval/fd_digits_1k" in proc.stdout and "warning" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["primary_quality"] == summary["rank"] == "eval/fd_digits_1k"
    assert [g["axes"] for g in summary["groups"]] == [["unet_small"], ["unet_tiny"]]
    md = (out / "report.md").read_text()
    for group in summary["groups"]:
        members = [r for r in runs if OmegaConf.load(r / "config.yaml").choices.model == group["axes"][0]]
        for which, values in (("best", [min(fd[r]) for r in members]), ("final", [fd[r][-1] for r in members])):
            low, high = stats.t.interval(0.95, 1, loc=np.mean(values), scale=stats.sem(values))
            assert group[f"{which} eval/fd_digits_1k"]["mean"] == pytest.approx(np.mean(values))
            assert group[f"{which} eval/fd_digits_1k"]["ci95"] == pytest.approx((high - low) / 2)
            assert f"{np.mean(values):.4g} ± {(high - low) / 2:.4g}" in md
    assert "best eval/fd_digits_1k ↓" in md and "final eval/cs_digits_1k ↑" in md
    assert "eval/seconds" not in md  # the evaluation's timing is not a quality metric
    assert Image.open(out / "quality.png").size[0] > 100
    # The sweep's objective can be named instead: classifier score, higher is better.
    run_main("compare", *map(str, runs), "by=model", "rank=eval/cs_digits_1k", f"out={out}", check=True)
    ranked = json.loads((out / "summary.json").read_text())["groups"]
    assert [g["axes"] for g in ranked] == [["unet_tiny"], ["unet_small"]]

    # Losses of different prediction targets are not comparable: said when the ranking would use them.
    v_run, _ = train("scheduler.prediction_type=v_prediction", "trainer.max_steps=3", "trainer.log_every=1",
                     "metric=none")
    tiny = [r for r in runs if OmegaConf.load(r / "config.yaml").choices.model == "unet_tiny"]
    plain = copy_runs([sweep_dir / r.name for r in tiny], tmp_path / "plain")
    for run in plain:  # as runs that measured no quality
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(run)))
    proc = run_main("compare", *map(str, plain), str(v_run), "by=scheduler.prediction_type", f"out={tmp_path / 'loss'}", check=True)
    assert ("warning: losses are not comparable: runs differ in scheduler.prediction_type (epsilon, v_prediction)"
            in proc.stderr)
    add_quality(v_run, {"eval/fd_digits_1k": [50.0, 45.0]})
    proc = run_main("compare", *map(str, tiny), str(v_run), "by=scheduler.prediction_type", f"out={tmp_path / 'fair'}", check=True)
    assert "ranked by eval/fd_digits_1k" in proc.stdout and "not comparable" not in proc.stderr


@pytest.mark.slow
def test_runs_lists_statuses_and_compare_takes_finished_runs(grid_sweep, train, tmp_path):
    sweep_dir, _ = grid_sweep
    outputs = tmp_path / "outputs"
    copy_runs(sorted(p.parent for p in sweep_dir.glob("*/run.json")), outputs / "sweep")
    failed, _ = train("trainer.lr=1e30", name="outputs/failed", check=False)  # the loss blows up
    empty, _ = train("trainer.batch_size=6", "trainer.grad_accum=4", name="outputs/refused", check=False, main=True)
    killed = outputs / "sweep" / "killed"  # as a run killed outright leaves it: still "running"
    shutil.copytree(sorted((outputs / "sweep").iterdir())[0], killed, symlinks=True)
    info = json.loads((killed / "run.json").read_text())
    (killed / "run.json").write_text(json.dumps({**info, "status": "running", "end": None}))
    assert json.loads((failed / "run.json").read_text())["status"] == "failed" and not (empty / "run.json").exists()

    proc = run_main("compare", str(outputs), "by=model", f"out={tmp_path / 'report'}", check=True)
    assert "skipped 2 of 6 runs (1 failed, 1 running): compared status=finished only" in proc.stdout
    assert "compared 4 runs" in proc.stdout
    proc = run_main("compare", str(outputs), "by=model", "status=all", f"out={tmp_path / 'report'}", check=True)
    assert "compared 6 runs" in proc.stdout
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| failed |" in md and "| running |" in md

    listing = run_main("runs", str(outputs), check=True).stdout
    assert listing.splitlines()[-1] == "7 runs: 4 finished, 1 failed, 1 empty, 1 running"
    status_of = {line.split()[0]: line.split()[2] for line in listing.splitlines()[1:-1]}
    assert status_of[str(failed)] == "failed" and status_of[str(empty)] == "empty"
    assert status_of[str(killed)] == "running" and list(status_of.values()).count("finished") == 4
    assert run_main("runs", str(outputs), "status=failed", check=True).stdout.splitlines()[1].split()[0] == str(failed)

    proc = run_main("runs", str(outputs), "remove=failed,empty", check=True)
    assert "would remove 2 runs" in proc.stdout and "yes=true" in proc.stdout
    assert failed.exists() and empty.exists()
    proc = run_main("runs", str(outputs), "remove=failed,empty", "yes=true", check=True)
    assert "removed 2 runs" in proc.stdout
    assert not failed.exists() and not empty.exists()
    assert killed.exists() and len(list(outputs.glob("sweep/*/run.json"))) == 5


@pytest.mark.slow
def test_compare_warns_when_runs_differ_beyond_the_compared_axes(grid_sweep, train, tmp_path):
    sweep_dir, _ = grid_sweep
    other, _ = train("model=unet_tiny", "seed=2", "trainer.max_steps=2", name="shorter")
    proc = run_main("compare", str(sweep_dir), str(other), "by=model", f"out={tmp_path / 'report'}", check=True)
    assert re.search(r"warning: runs differ in trainer.max_steps besides by=model: 2, 3", proc.stderr)
    assert "warning: runs reached different steps: 2, 3" in proc.stderr
    assert "trainer.max_steps" in (tmp_path / "report" / "report.md").read_text()


def test_compare_bad_input_is_one_line(tmp_path):
    proc = run_main("compare", str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path}: no diffexp run directories found there"
    for option, says in (("status=done", "status=done: expected all or a list of finished"),
                         ("smooth=1", "smooth=1: expected a number from 0")):
        proc = run_main("compare", str(tmp_path), option, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and says in proc.stderr
    proc = run_main("runs", str(tmp_path), "remove=finished,failed", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == ("error: remove=finished,failed: only failed and empty runs "
                                                            "can be removed (finished runs are kept)")
    proc = run_main("compare", "source=wandb", "project=someone/diffexp", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "W&B is not reachable" in proc.stderr


def test_compare_and_runs_parse_their_command_line_as_hydra_apps(tmp_path):
    odd = tmp_path / "it's a,b=c"  # a path Hydra's override grammar would not take as typed
    odd.mkdir()
    proc = run_main("compare", str(odd), "by=model,scheduler", "status=finished,failed", f"out={odd}", "--cfg", "job",
                    check=True)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["paths"] == [str(odd)] and cfg["out"] == str(odd)
    assert cfg["by"] == ["model", "scheduler"] and cfg["status"] == ["finished", "failed"]
    assert not list(odd.iterdir())  # --cfg job prints and runs nothing
    proc = run_main("compare", "--help", check=True)
    assert "python -m diffexp.compare RUN_OR_SWEEP_DIR..." in proc.stdout and "smooth: 0.9" in proc.stdout
    assert yaml.safe_load(run_main("runs", "--cfg", "job", check=True).stdout)["paths"] == ["outputs"]
    proc = run_main("compare", str(odd), check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {odd}: no diffexp run directories found there"
    proc = run_main("runs", str(tmp_path), "yes=maybe", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: yes=maybe: expected true or false"


# ---------------------------------------------------------------------------- reproduce
@pytest.mark.slow
def test_reproduce_check_reports_identical_losses(train, tmp_path):
    original, _ = train("trainer.max_steps=3", name="original")
    info = json.loads((original / "run.json").read_text())
    info["packages"]["diffusers"] = "0.1.0"  # as if the run had been made with an older diffusers
    (original / "run.json").write_text(json.dumps(info))
    again = tmp_path / "again"
    proc = run_main("reproduce", f"run={original}", "check=true", f"hydra.run.dir={again}", check=True)
    assert "check: 3 logged losses compared; largest difference 0 (identical)" in proc.stdout
    assert "warning: package versions differ: diffusers 0.1.0 -> " in proc.stderr
    assert [r["train/loss"] for r in rows(again)] == [r["train/loss"] for r in rows(original)]
    before, after = OmegaConf.load(original / "config.yaml"), OmegaConf.load(again / "config.yaml")
    assert before == after  # the same resolved config, in a new run directory
    assert json.loads((again / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_reproduce_applies_overrides_and_checks_the_steps_it_shares(train, tmp_path):
    original, _ = train("trainer.max_steps=3", name="original")
    proc = run_main("reproduce", f"run={original}", "check=true", "trainer.max_steps=2", "logger=none",
                   f"hydra.run.dir={tmp_path / 'shorter'}", check=True)
    assert "check: 2 logged losses compared; largest difference 0 (identical)" in proc.stdout
    assert OmegaConf.load(tmp_path / "shorter" / "config.yaml").trainer.max_steps == 2


def test_reproduce_bad_input_is_one_line(tmp_path):
    proc = run_main("reproduce", f"run={tmp_path}", f"hydra.run.dir={tmp_path / 'new'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: run={tmp_path}: not a diffexp run directory (no config.yaml)"
    proc = run_main("reproduce", "run=someone/diffexp/abc123", f"hydra.run.dir={tmp_path / 'new'}", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "W&B is not reachable" in proc.stderr
