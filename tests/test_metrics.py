"""Sample quality: the metrics against independent formulas, evaluation during training and from the
command line, several processes, the results store, and the Inception path with a random-weights
file (the real torch-fidelity code; the numbers are meaningless, the plumbing is not). Evaluation during
two-process training is tested in test_multiprocess.py, on that module's one launch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import REPO, cli_env, compose_config, run_main
from omegaconf import OmegaConf
from wandb_files import find_runs

from diffexp.quality.evaluator import auto_eval_every, resolve_metric, score
from diffexp.report.render import fmt, fmt_ci

SMALL = ["metric.num_samples=8", "metric.num_real=16", "metric.batch_size=8"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fd_matches_scipy_frechet_distance():
    metric = resolve_metric(compose_config(["metric=fid_is"]).metric, compose_config().dataset.copy())
    metric.metrics = ["fd"]
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(256, 256)) / 16
    real = rng.normal(size=(2500, 256)) @ mixing
    fake = (rng.normal(size=(2500, 256)) * 1.3 + 0.2) @ mixing
    ours = score(metric, torch.from_numpy(real).float(), torch.from_numpy(fake).float(), torch.zeros(2500, 10))
    real32, fake32 = real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64)
    mu1, mu2 = real32.mean(0), fake32.mean(0)
    s1, s2 = np.cov(real32, rowvar=False), np.cov(fake32, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert expected > 1
    assert ours["eval/fid_2.5k"] == pytest.approx(expected, rel=1e-4)


def test_names_carry_the_feature_network_and_auto_picks_it_for_the_dataset():
    digits = resolve_metric(compose_config().metric, compose_config().dataset)
    assert (digits.network, digits.num_samples) == ("digits", 500)
    real, fake = torch.randn(50, 128), torch.randn(40, 128) + 0.1
    logits = torch.randn(40, 10)
    names = set(score(digits, real, fake, logits, real_logits=torch.randn(50, 10)))
    assert {"eval/fd_digits_40", "eval/fd_digits_balanced_40", "eval/cs_digits_40", "eval/kid_digits_40",
            "eval/precision_digits_40", "eval/recall_digits_40", "eval/coverage_digits_40", "eval/balance_digits_40",
            "eval/classmix_digits_40"} <= names
    assert not any(n.startswith(("eval/fid", "eval/is_")) for n in names)  # never mistaken for Inception's
    rgb = compose_config(["dataset=flowers102"])
    assert resolve_metric(rgb.metric, rgb.dataset).network == "inception"


def test_a_feature_network_that_does_not_fit_the_data_is_refused_in_one_line(train):
    run, proc = train("dataset=flowers102", "metric=digits", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: metric=digits: its feature network is a digit classifier, which does not fit dataset=flowers102 "
        "(3 channel(s)); use metric=fid_is (Inception) or metric=auto")
    assert not (run / "run.json").exists()


def test_auto_interval_keeps_evaluation_within_its_budget():
    assert auto_eval_every(max_steps=1500, budget=0.1, train_flops_per_step=1.0, eval_flops=30.0, multiple_of=50) == 300
    # 1500 steps x 0.1 = 150 step-costs: 5 evaluations of 30 fit, at 300, 600, ..., 1500
    assert auto_eval_every(max_steps=1500, budget=0.1, train_flops_per_step=1.0, eval_flops=200.0) == 1500
    assert auto_eval_every(max_steps=1000, budget=0.1, train_flops_per_step=1.0, eval_flops=1.0, multiple_of=50) == 50


def test_a_short_default_run_logs_quality_to_metrics_and_wandb(train):
    """The default config (digits, metric=auto, eval_every=auto), shortened: quality curves on any machine."""
    run_dir, result = train("trainer.max_steps=6", "trainer.log_every=2", "metric.num_samples=20",
                            "metric.batch_size=10", "metric.budget=10", "logger=wandb")
    assert "evaluating every 2 steps (trainer.eval_every=auto)" in result.stderr
    evals = [r for r in rows(run_dir) if "eval/fd_digits_20" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for row in evals:
        assert row["eval/fd_digits_20"] > 0 and 1 <= row["eval/cs_digits_20"] <= 10
        assert 0 <= row["eval/precision_digits_20"] <= 1 and 0 <= row["eval/coverage_digits_20"] <= 1
        assert row["eval/fd_digits_balanced_20"] > 0 and 0 <= row["eval/classmix_digits_20"] <= 1
    info = json.loads((run_dir / "run.json").read_text())
    assert info["eval_every"] == 2 and 0 < info["eval_seconds"] < info["loop_seconds"]
    assert OmegaConf.load(run_dir / "config.yaml").metric.network == "digits"  # auto, recorded as decided
    [wb] = find_runs(run_dir / "wandb")
    history = [h for h in wb.history if "eval/fd_digits_20" in h]
    assert [h["train/step"] for h in history] == [2, 4, 6]
    assert [h["eval/fd_digits_20"] for h in history] == pytest.approx([r["eval/fd_digits_20"] for r in evals])
    assert wb.summary["eval/fd_digits_20"]["min"] == pytest.approx(min(r["eval/fd_digits_20"] for r in evals))
    assert wb.summary["eval/fd_digits_balanced_20"]["min"] == pytest.approx(min(r["eval/fd_digits_balanced_20"] for r in evals))
    assert wb.summary["eval/classmix_digits_20"]["min"] == pytest.approx(min(r["eval/classmix_digits_20"] for r in evals))


def test_evaluation_leaves_the_training_random_streams_as_they_were(train):
    """The losses (noise, timesteps) are the same with and without in-training evaluation, and an
    evaluation leaves every device's generator where it found it."""
    common = ["trainer.max_steps=6", "trainer.log_every=1", "trainer.sample_every=0", "metric.num_samples=10",
              "metric.batch_size=10"]
    with_eval, _ = train(*common, "trainer.eval_every=2", name="with")
    without, _ = train(*common, "trainer.eval_every=0", name="without")
    assert [r["train/loss"] for r in rows(with_eval) if "train/loss" in r] == \
        [r["train/loss"] for r in rows(without) if "train/loss" in r]
    assert len([r for r in rows(with_eval) if "eval/fd_digits_10" in r]) == 3

    from accelerate import Accelerator

    from diffexp.data.datasets import load_images
    from diffexp.models.build import build_sampler
    from diffexp.quality.evaluator import Evaluator
    from diffexp.records.rundir import RunDir
    from diffexp.sampling.generate import load_run_model

    cfg = RunDir(with_eval).config()
    evaluator = Evaluator(cfg.metric, Accelerator(cpu=True), load_images(cfg.dataset, cfg.cache_dir), cfg.dataset,
                          cfg.cache_dir)
    unet = load_run_model(with_eval, "cpu").denoiser
    torch.manual_seed(123)
    states = [torch.get_rng_state()] + [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    evaluator(unet, build_sampler(cfg.sampler, cfg.scheduler), 2)
    after = [torch.get_rng_state()] + [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(states, after))


def test_evaluate_keeps_every_setting_and_two_processes_give_one_processs_numbers(finished_run, cache_dir):
    run = finished_run
    common = [f"run={run}", "metric.num_samples=12", "metric.batch_size=5", f"cache_dir={cache_dir}"]
    run_main("evaluate", "-m", *common, "sampler=ddim,dpmpp", "sampler.steps=2,3", check=True)
    results = json.loads((run / "eval.json").read_text())["results"]
    assert sorted((r["sampler"], r["sampler_steps"]) for r in results) == [("ddim", 2), ("ddim", 3), ("dpmpp", 2),
                                                                          ("dpmpp", 3)]
    assert len({r["eval/fd_digits_12"] for r in results}) == 4
    # with the likelihood too (both estimators, 6 images in chunks of 2: split 2:1 as well)
    nll = ["metric.nll=true", "metric.nll_images=6", "metric.nll_batch_size=2", "metric.nll_steps=1",
           "metric.nll_vlb_terms=2"]
    single = json.loads(run_main("evaluate", *common, "sampler=ddim", "sampler.steps=2", "metric.seed=1", *nll,
                                 check=True).stdout.strip().splitlines()[-1])
    assert len(json.loads((run / "eval.json").read_text())["results"]) == 5  # a new seed is a new entry

    # The same evaluation under two processes: chunks of 5 images (5 + 5 + 2) split 2:1, features
    # gathered in chunk order, the metrics computed once: the same numbers.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffexp.evaluate", *common,
           "sampler=ddim", "sampler.steps=2", "metric.seed=1", *nll]
    two = subprocess.run(cmd, cwd=REPO, env=cli_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    double = json.loads(two.stdout.strip().splitlines()[-1])
    assert double["num_processes"] == 2 and single["num_processes"] == 1
    assert {"eval/nll_bpd_6", "eval/nll_bpd_vlb_6"} <= set(single)
    for key, value in single.items():
        if key.startswith("eval/") and not key.endswith("seconds"):
            assert double[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert len(json.loads((run / "eval.json").read_text())["results"]) == 5  # the same key: replaced, not added

    # compare pools the results per sampler setting (here ddim 2 steps: seeds 0 and 1) and names the best
    # within each network-evaluation budget.
    results = json.loads((run / "eval.json").read_text())["results"]
    assert all(r["nfe"] == r["sampler_steps"] for r in results)  # DDIM and DPM-Solver++: one call a step
    run_main("compare", str(run), f"out={run / 'cmp'}", check=True)
    samplers = json.loads((run / "cmp" / "summary.json").read_text())["samplers"]
    assert samplers["metric"] == "eval/fd_digits_12"
    by_setting = {(r["sampler"], r["steps"]): r for r in samplers["rows"]}
    assert sorted(by_setting) == [("ddim", 2), ("ddim", 3), ("dpmpp", 2), ("dpmpp", 3)]
    pooled = [r["eval/fd_digits_12"] for r in results if (r["sampler"], r["sampler_steps"]) == ("ddim", 2)]
    assert len(pooled) == 2 and by_setting["ddim", 2]["n"] == 2
    assert by_setting["ddim", 2]["eval/fd_digits_12"]["mean"] == pytest.approx(np.mean(pooled))
    assert by_setting["ddim", 2]["eval/fd_digits_12"]["ci95"] > 0 and by_setting["dpmpp", 3]["n"] == 1
    [best] = samplers["best"]
    lowest = min(samplers["rows"], key=lambda r: r["eval/fd_digits_12"]["mean"])
    assert best["nfe<=20"]["sampler"] == lowest["sampler"] and best["nfe<=20"]["steps"] == lowest["steps"]
    report = (run / "cmp" / "report.md").read_text()
    assert "## Best sampler per group" in report and "| ddim | 2 | 2 | 12 |" in report

    # A result at another sample count is a row of its own that shows its metrics at its own count
    # (FD at 6 samples is another number than FD at 12), after the lead count's rows.
    six = json.loads(run_main("evaluate", f"run={run}", "metric.num_samples=6", "metric.batch_size=5",
                              f"cache_dir={cache_dir}", "sampler=ddim", "sampler.steps=2", check=True)
                     .stdout.strip().splitlines()[-1])
    run_main("compare", str(run), f"out={run / 'cmp6'}", check=True)
    lines = (run / "cmp6" / "report.md").read_text().splitlines()
    rows = [line.split("|") for line in lines if line.startswith(("| None | ddim |", "| None | dpmpp |"))]
    assert [row[5].strip() for row in rows] == ["12"] * 4 + ["6"]  # group, sampler, steps, NFE, samples
    assert rows[-1][8].strip() == fmt(six["eval/fd_digits_6"]) != "–"
    assert "| eval/fd_digits ↓ | eval/fd_digits_balanced ↓ |" in "\n".join(lines)  # the lead, then its variant


def test_evaluate_scores_a_file_of_images_with_the_numbers_of_its_own_samples(finished_run, cache_dir, tmp_path):
    # `sample` writes seed 3's images (one chunk); evaluate gives that file the numbers it gives when it
    # samples seed 3 itself, and keeps the file's result out of eval.json (the images need not be the run's).
    from test_inputs import one_error_line

    images = tmp_path / "seed3.npz"
    run_main("sample", f"run={finished_run}", "n=12", "seed=3", f"out={images}", check=True)
    common = [f"run={finished_run}", f"cache_dir={cache_dir}", "metric.seed=3", "metric.batch_size=12"]
    own = json.loads(run_main("evaluate", *common, "metric.num_samples=12", check=True).stdout.strip().splitlines()[-1])
    kept = (finished_run / "eval.json").read_bytes()
    given = json.loads(run_main("evaluate", *common, f"images={images}", check=True).stdout.strip().splitlines()[-1])
    scores = {k: v for k, v in own.items() if k.startswith("eval/") and k != "eval/seconds"}
    assert len(scores) > 5 and {k: given[k] for k in scores} == scores
    assert (given["num_samples"], given["images"]) == (12, str(images)) and "sampler" not in given
    assert (finished_run / "eval.json").read_bytes() == kept
    # Another resolution than the run's dataset is refused in one line, before anything is loaded.
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((4, 16, 16, 1), np.uint8))
    size = OmegaConf.load(finished_run / "config.yaml").dataset.resolution
    assert one_error_line(run_main("evaluate", *common, f"images={wrong}")) == (
        f"error: images={wrong}: expected uint8 images of {size}x{size}x1 (the run's dataset), got uint8 4x16x16x1")
    # Too few images for a metric (precision/recall's 3 neighbours), and a .npy, likewise.
    few, npy = tmp_path / "few.npz", tmp_path / "images.npy"
    np.savez(few, images=np.zeros((3, size, size, 1), np.uint8))
    np.save(npy, np.zeros((4, size, size, 1), np.uint8))
    assert one_error_line(run_main("evaluate", *common, f"images={few}")).startswith(
        f"error: images={few} (3 images): metric.pr_k=3: precision/recall needs")
    assert one_error_line(run_main("evaluate", *common, f"images={npy}")).startswith(f"error: images={npy}: not an .npz")


def test_a_cell_of_fewer_values_than_its_row_says_how_many():
    pooled = {"mean": 0.6, "ci95": 0.09, "n": 15}
    assert fmt_ci(pooled, 15) == "0.6 ± 0.09" and fmt_ci(pooled) == "0.6 ± 0.09"
    assert fmt_ci({"mean": 0.5121, "ci95": None, "n": 1}, 15) == "0.5121 (n=1)"  # not a mean of the row's 15
    assert fmt_ci(None, 3) == "–"


# --- Inception: the real torch-fidelity code path, with a random-weights file ------------------------------


def test_training_evaluates_with_inception_and_evaluate_reuses_the_reference(train, inception_file, cache_dir):
    # one evaluation, at the last step (each costs seconds here: 2048-d Frechet distances, Inception at 299 px)
    run_dir, result = train("metric=fid_is_kid", f"metric.weights={inception_file}", *SMALL, "trainer.eval_every=4")
    assert "reference statistics: 16 real images" in result.stderr
    evals = [r for r in rows(run_dir) if "eval/fid_8" in r]
    assert [r["step"] for r in evals] == [4]
    for row in evals:
        assert np.isfinite(row["eval/fid_8"]) and row["eval/fid_8"] > 0
        assert np.isfinite(row["eval/is_8"]) and row["eval/is_8"] >= 1 - 1e-5
        assert np.isfinite(row["eval/kid_8"]) and row["eval/seconds"] > 0
    [reference] = list((cache_dir / "metrics").glob("reference-inception-digits-8px-16-*.pt"))
    mtime = reference.stat().st_mtime_ns
    proc = run_main("evaluate", f"run={run_dir}", "metric=fid_is_kid", f"metric.weights={inception_file}", *SMALL,
                   "sampler=ddpm", "sampler.steps=3", f"cache_dir={cache_dir}", check=True)
    assert f"reference statistics: cache hit {reference}" in proc.stdout + proc.stderr
    assert reference.stat().st_mtime_ns == mtime
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result in json.loads((run_dir / "eval.json").read_text())["results"]
    assert (result["sampler"], result["sampler_steps"], result["num_samples"], result["num_real"]) == ("ddpm", 3, 8, 16)


def test_missing_inception_weights_say_once_what_is_needed(train, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache; the download fails offline
    run_dir, proc = train("metric=fid_is", "trainer.eval_every=0")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "not evaluated during training" in line]
    assert len(lines) == 1 and "metric.weights=FILE" in lines[0] and str(tmp_path / "torch_home") in lines[0]
    finished, proc = train("metric=fid_is", "trainer.eval_every=2", *SMALL, name="warned")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "Inception weights" in line]
    assert len(lines) == 1 and "training continues without FID/IS" in lines[0]
    assert (finished / "model").is_dir() and not [r for r in rows(finished) if "eval/seconds" in r]
    _, proc = train("metric=fid_is", "trainer.eval_every=2", "metric.required=true", *SMALL, name="required",
                    check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "metric.weights=FILE" in errors[0]
    proc = run_main("evaluate", f"run={finished}", "metric=fid_is", "metric.weights=/nonexistent/inception.pth",
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: metric.weights=/nonexistent/inception.pth: no such file")

