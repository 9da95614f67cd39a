"""Sample-quality metrics: the real torch-fidelity InceptionV3 code path with a random-weights file.

The weights are random (numbers meaningless), so the tests check properties that hold for any
feature extractor, plus the plumbing: in-training evaluation, the evaluate CLI, the cache, errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import scipy.linalg
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, cli_env, run_cli
from diffexp.wandb_files import find_runs
from diffexp.cli import CONFIG_PATH
from diffexp.data import load_images
from diffexp.evaluation import add_features, build_metrics, compute_metrics, inception_features, load_inception

SMALL = ["metric.num_samples=8", "metric.num_real=16", "metric.batch_size=8"]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def log_text(proc) -> str:
    return proc.stdout + proc.stderr


def test_fid_matches_scipy_frechet_distance():
    cfg = composed("metric=fid_is")
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(2048, 2048)) / 45
    real = rng.normal(size=(2500, 2048)) @ mixing
    fake = (rng.normal(size=(2500, 2048)) * 1.3 + 0.2) @ mixing
    metrics = build_metrics(cfg.metric, num_fake=len(fake), num_real=len(real))
    del metrics["is"]
    add_features(metrics, torch.from_numpy(real).float(), None, real=True)
    add_features(metrics, torch.from_numpy(fake).float(), None, real=False)
    ours = compute_metrics(metrics, len(fake))["eval/fid_2.5k"]

    real32, fake32 = real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64)
    mu1, mu2 = real32.mean(0), fake32.mean(0)
    s1, s2 = np.cov(real32, rowvar=False), np.cov(fake32, rowvar=False)
    # tr sqrt(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2), a symmetric problem scipy's eigh solves fast.
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    tr_covmean = np.sqrt(scipy.linalg.eigvalsh(root1 @ s2 @ root1).clip(min=0)).sum()
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    assert expected > 1
    assert ours == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(inception_file, cache_dir):
    cfg = composed("metric=fid_is", "dataset.resolution=8")
    images = load_images(cfg.dataset, cache_dir)[:16]
    net = load_inception(inception_file, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)

    def noisy(sigma: float) -> torch.Tensor:
        noise = torch.randn(images.shape, generator=gen) * sigma
        return (images.float() + noise).clamp(0, 255).round().to(torch.uint8)

    batches = [images, noisy(30), noisy(90)]
    pool, _ = inception_features(net, torch.cat(batches), batch_size=16)
    clean, mild, strong = pool.split(len(images))
    fids = []
    for fake in (clean, mild, strong):
        metrics = build_metrics(cfg.metric, num_fake=len(fake), num_real=len(clean))
        del metrics["is"]
        add_features(metrics, clean, None, real=True)
        add_features(metrics, fake, None, real=False)
        fids.append(compute_metrics(metrics, len(fake))["eval/fid_16"])
    assert abs(fids[0]) < 1e-3 * fids[1], fids
    assert fids[0] < fids[1] < fids[2], fids


@pytest.mark.slow
def test_training_evaluates_and_evaluate_cli_reuses_reference(train, inception_file, cache_dir):
    run_dir, proc = train("metric=fid_is_kid", f"metric.weights={inception_file}", *SMALL, "trainer.eval_every=2",
                          "logger=wandb")
    assert "reference statistics: 16 real images" in log_text(proc)
    assert "took" in log_text(proc)  # the time of each evaluation is logged
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fid_8" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for row in evals:
        assert np.isfinite(row["eval/fid_8"]) and row["eval/fid_8"] > 0
        assert np.isfinite(row["eval/is_8"]) and row["eval/is_8"] >= 1 - 1e-5
        assert np.isfinite(row["eval/kid_8"]) and row["eval/seconds"] > 0
    [reference] = list((cache_dir / "metrics").glob("reference-digits-8px-16-*.pt"))
    mtime = reference.stat().st_mtime_ns

    proc = run_cli("evaluate", f"run={run_dir}", "metric=fid_is_kid", f"metric.weights={inception_file}", *SMALL,
                   "sampler=ddpm", "sampler.steps=3", f"cache_dir={cache_dir}", "wandb=true")
    assert f"reference statistics: cache hit {reference}" in log_text(proc)
    assert reference.stat().st_mtime_ns == mtime
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads((run_dir / "eval.json").read_text())
    assert result["eval/fid_8"] > 0 and result["eval/is_8"] >= 1 - 1e-5 and "eval/kid_8" in result
    assert (result["sampler"], result["sampler_steps"], result["num_samples"], result["num_real"]) == ("ddpm", 3, 8, 16)
    # wandb=true continued the training's W&B run and put the result in its summary
    runs = find_runs(run_dir / "wandb")
    assert len(runs) == 2 and {r.run_id for r in runs} == {json.loads((run_dir / "run.json").read_text())["wandb_run_id"]}
    assert runs[-1].summary["eval/fid_8"] == pytest.approx(result["eval/fid_8"])


def test_default_run_without_weights_says_once_what_evaluation_needs(train, tmp_path):
    env = cli_env(TORCH_HOME=str(tmp_path / "torch_home"))  # an empty hub cache
    run_dir, proc = train(env=env)  # the default metric (fid_is) with trainer.eval_every=0
    lines = [line for line in log_text(proc).splitlines() if "not evaluated during training" in line]
    assert len(lines) == 1 and "metric.weights=FILE" in lines[0] and str(tmp_path / "torch_home") in lines[0]
    assert (run_dir / "model").is_dir()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["choices"]["metric"] == "fid_is"


@pytest.mark.slow
def test_missing_weights_warn_once_or_stop_when_required(train, tmp_path):
    env = cli_env(TORCH_HOME=str(tmp_path / "torch_home"))  # an empty hub cache; the download fails offline
    finished, proc = train("metric=fid_is", "trainer.eval_every=2", *SMALL, env=env)
    lines = [line for line in log_text(proc).splitlines() if "Inception weights" in line]
    assert len(lines) == 1, log_text(proc)
    assert "metric.weights=FILE" in lines[0] and "training continues without FID/IS" in lines[0]
    assert (finished / "model").is_dir()
    assert not [line for line in (finished / "metrics.jsonl").read_text().splitlines() if "eval/" in line]

    run_dir, proc = train("metric=fid_is", "trainer.eval_every=2", "metric.required=true", *SMALL, name="required",
                          env=env, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Inception weights" in errors[0] and "metric.weights=FILE" in errors[0]

    proc = run_cli("evaluate", f"run={finished}", "metric.weights=/nonexistent/inception.pth", check=False, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: metric.weights=/nonexistent/inception.pth: no such file")


@pytest.mark.slow
def test_two_processes_share_the_samples_and_sync_the_metrics(tmp_path, inception_file, cache_dir):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffexp.train", "debug=tiny",
           f"hydra.run.dir={run_dir}", f"cache_dir={cache_dir}", "logger=none", "metric=fid_is_kid",
           f"metric.weights={inception_file}", "metric.num_samples=9", "metric.num_real=16", "metric.batch_size=8",
           "trainer.eval_every=4"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es)" in log_text(proc)
    # One row, written once, from the metric states of both processes (5 + 4 samples, 8 + 8 reference images).
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/" in line]
    assert [r["step"] for r in evals] == [4]
    assert evals[0]["eval/fid_9"] > 0 and np.isfinite(evals[0]["eval/kid_9"])
