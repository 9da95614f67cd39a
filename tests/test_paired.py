"""Coupled twins of DDPM's images (diffexp.research.coupling) and the paired comparison command (diffexp.research.paired).

The tiny run's denoiser is barely trained: what is tested is the sampling arithmetic, which any weights show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, run_main, run_train
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from omegaconf import OmegaConf

from diffexp.models.build import build_sampler
from diffexp.records.rundir import RunDir
from diffexp.research.coupling import coupled_generate, interval_weights, noise_weights, step_intervals
from diffexp.sampling.generate import generate, load_run_model

DDPM = OmegaConf.load(REPO / "conf" / "sampler" / "ddpm.yaml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, dataset_cache) -> Path:
    """This module's finished tiny run (W&B offline), trained on 200 noise levels instead of 1000: DDPM
    over every level, the study's reference, then costs a fifth (the arithmetic is the same)."""
    base = tmp_path_factory.mktemp("tiny_run_200")
    (base / "cache").mkdir()
    (base / "cache" / "datasets").symlink_to(dataset_cache, target_is_directory=True)
    run_train(*TINY, f"cache_dir={base / 'cache'}", "logger=wandb", "scheduler.num_train_timesteps=200",
              run_dir=base / "run")
    return base / "run"


def parts(run):
    model = load_run_model(run, "cpu")
    return model.denoiser, build_sampler(DDPM, model.cfg.scheduler)


def test_with_the_same_steps_the_twin_of_a_ddpm_image_is_that_image(tiny_run):
    # First-order DPM-Solver++ SDE over every timestep is DDPM's posterior step written in
    # log-SNR: fed the reference's own draws, it must retrace DDPM's path (clipping off on both).
    denoiser, reference = parts(tiny_run)
    # 200 training steps instead of 1000: the arithmetic is the same, the test five times faster.
    reference = DDPMScheduler.from_config(reference.config, clip_sample=False, num_train_timesteps=200)
    sde = DPMSolverMultistepScheduler.from_config(reference.config, algorithm_type="sde-dpmsolver++", solver_order=1,
                                                  timestep_spacing="trailing", final_sigmas_type="zero")
    steps = reference.config.num_train_timesteps
    ddpm = generate(denoiser, reference, n=3, steps=steps, seed=5, batch_size=2)  # two chunks, two chunk seeds
    twins = coupled_generate(denoiser, reference, sde, n=3, steps=steps, seed=5, batch_size=2)
    assert np.abs(ddpm.astype(int) - twins.astype(int)).max() <= 1
    others = coupled_generate(denoiser, reference, sde, n=3, steps=steps, seed=6, batch_size=2)
    assert np.abs(ddpm.astype(int) - others.astype(int)).mean() > 20  # another seed: other images


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_the_summed_draws_have_exactly_the_noise_of_a_dpm_solver_sde_step(schedule):
    cfg = OmegaConf.load(REPO / "conf" / "scheduler" / f"{schedule}.yaml")
    reference = build_sampler(DDPM, cfg)
    sde = build_sampler(OmegaConf.load(REPO / "conf" / "sampler" / "dpmpp_sde.yaml"), cfg)
    sde.set_timesteps(20)
    sigmas = [sde._sigma_to_alpha_sigma_t(s) for s in sde.sigmas]  # (alpha_t, sigma_t) at each step's start
    intervals = step_intervals(sde.timesteps, 1000)
    assert intervals[0] == (949, 999) and intervals[-1] == (0, 49)
    for i, (lo, hi) in enumerate(intervals[:-1]):  # the last step goes to sigma = 0: no noise
        (alpha_s, sigma_s), (alpha_t, sigma_t) = sigmas[i], sigmas[i + 1]
        h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
        _, w = interval_weights(reference, lo, hi)
        assert math.sqrt((w * w).sum()) == pytest.approx(float(sigma_t) * math.sqrt(1 - math.exp(-2 * h)), rel=1e-5)
    for ks, w in noise_weights(reference, sde.timesteps):
        assert (w * w).sum() == pytest.approx(1.0)


def test_twins_of_a_20_step_sampler_are_closer_to_ddpm_than_other_samples(tiny_run):
    denoiser, reference = parts(tiny_run)
    sde = build_sampler(OmegaConf.load(REPO / "conf" / "sampler" / "dpmpp_sde.yaml"), RunDir(tiny_run).config().scheduler)
    ddpm = generate(denoiser, reference, n=8, steps=reference.config.num_train_timesteps, seed=0).astype(float)
    twins = coupled_generate(denoiser, reference, sde, n=8, steps=20, seed=0).astype(float)
    strangers = coupled_generate(denoiser, reference, sde, n=8, steps=20, seed=1).astype(float)
    assert np.abs(ddpm - twins).mean() < 0.5 * np.abs(ddpm - strangers).mean()
    # A sampler whose step takes no outside noise shares the starting noise only: the same images again.
    euler = EulerDiscreteScheduler.from_config(reference.config)
    first = coupled_generate(denoiser, reference, euler, n=4, steps=10, seed=0)
    assert np.array_equal(first, coupled_generate(denoiser, reference, euler, n=4, steps=10, seed=0))
    assert not np.array_equal(first, coupled_generate(denoiser, reference, euler, n=4, steps=10, seed=1))


def test_paired_compares_a_sampler_with_ddpm_and_makes_ddpm_images_once(finished_run):
    args = [f"run={finished_run}", "metric.num_samples=10", "metric.batch_size=10", "bootstrap=100"]
    result = run_main("research.paired", *args, "seeds=[0,1]", "sampler=dpmpp_sde", "sampler.steps=5", check=True)
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert (line["sampler"], line["sampler_steps"], line["reference"], line["pairs"]) == ("dpmpp_sde", 5, "ddpm200", 20)
    fd = line["metrics"]["eval/fd_digits_20"]
    assert fd["low"] < fd["high"] and fd["within_tolerance"] == (fd["high"] <= 0.05)
    assert set(line["metrics"]) == {"eval/fd_digits_20", "eval/fd_digits_balanced_20", "eval/classmix_digits_20"}
    assert 0 <= line["same_class"] <= 1
    cached = sorted((finished_run / "paired").glob("ddpm200_seed*.npz"))
    assert [p.name.split("_")[1] for p in cached] == ["seed0", "seed1"]
    # The cached DDPM images are evaluate's for that seed: generate's chunks of metric.batch_size.
    denoiser, reference = parts(finished_run)
    assert np.array_equal(np.load(cached[0])["images"], generate(denoiser, reference, n=10, steps=200, seed=0,
                                                                     batch_size=10))
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = run_main("research.paired", *args, "sampler=ddim", "sampler.steps=5", "seeds=[1,0]", check=True)
    assert "cached in" in again.stdout + again.stderr and "making" not in again.stdout + again.stderr
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    kept = json.loads((finished_run / "paired" / "results.json").read_text())["results"]
    assert [(r["sampler"], r["seeds"]) for r in kept] == [("dpmpp_sde", [0, 1]), ("ddim", [0, 1])]
    assert {r["weights"] for r in kept} == {cached[0].stem.rsplit("_", 1)[1]}  # the weights the cache is keyed by
    ddim = json.loads(again.stdout.strip().splitlines()[-1])["metrics"]["eval/fd_digits_20"]
    assert ddim["reference"] == pytest.approx(fd["reference"])  # the same DDPM images

    # The study's own table shows them, a row per result, with the verdicts paired printed.
    shown = run_main("research.paired_report", str(finished_run), check=True).stdout
    rows = [line for line in shown.splitlines() if line.startswith("| ") and "| ddpm200 |" in line]
    verdict = "within" if fd["within_tolerance"] else "not shown within"
    assert len(rows) == 2 and "| dpmpp_sde | 5 | ddpm200 | 20 |" in rows[0] and "| ddim | 5 |" in rows[1]
    assert (f"{100 * fd['relative']:+.1f}% ({100 * fd['low']:+.1f}% .. {100 * fd['high']:+.1f}%): {verdict} 5%"
            in rows[0])
    assert "eval/fd_digits vs reference | eval/fd_digits_balanced vs reference |" in shown
    # compare, part of the core, no longer knows the study.
    run_main("compare", str(finished_run), f"out={finished_run / 'cmp'}", check=True)
    assert "ddpm200" not in (finished_run / "cmp" / "report.md").read_text()
    assert "paired" not in json.loads((finished_run / "cmp" / "summary.json").read_text())


def test_nothing_in_the_core_imports_the_study():
    import ast

    core = [p for p in (REPO / "diffexp").rglob("*.py") if "research" not in p.parts]
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("diffexp.research") for n in names), path


def test_paired_report_without_results_is_one_line(finished_run):
    from test_inputs import one_error_line

    result = run_main("research.paired_report", str(finished_run))
    assert one_error_line(result).startswith("error: no paired results in 1 runs")


@pytest.mark.parametrize("args,expected", [
    (["seeds=[]"], "error: seeds=[]: expected a list of distinct integer sampling seeds"),
    (["seeds=[0,0]"], "error: seeds=[0, 0]: expected a list of distinct integer sampling seeds"),
    (["tolerance=0"], "error: tolerance=0: expected a positive fraction"),
    (["bootstrap=5"], "error: bootstrap=5: expected an integer number of resamples of at least 100"),
    (["sampler=fm_euler"], "error: sampler=FlowMatchEulerDiscreteScheduler: cannot sample a model trained with"),
])
def test_a_wrong_paired_input_is_one_line(args, expected, finished_run):
    from test_inputs import one_error_line

    result = run_main("research.paired", f"run={finished_run}", *args)
    assert one_error_line(result).startswith(expected)
    assert not (finished_run / "paired").exists()


def test_the_interval_resamples_pairs_not_sets():
    # Twins that are the same image differ by nothing, in every resample: only a resampling that
    # keeps pairs together gives exactly 0 (resampling each set on its own would spread it).
    from diffexp.research.paired import relative_differences

    generator = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=generator)
    fake = torch.randn(200, 8, generator=generator) * 1.3 + 0.2
    logits = torch.randn(200, 10, generator=generator)
    real_logits = torch.randn(300, 10, generator=generator)
    same = relative_differences(real, real_logits, (fake, logits), (fake.clone(), logits.clone()), resamples=100)
    assert {k: (d["relative"], d["low"], d["high"]) for k, d in same.items()} == {"fd": (0, 0, 0), "fd_balanced": (0, 0, 0)}
    worse = relative_differences(real, None, (fake, logits), (fake * 1.2, logits), resamples=100)
    assert set(worse) == {"fd"} and 0 < worse["fd"]["low"] <= worse["fd"]["relative"] <= worse["fd"]["high"]


def test_the_basic_interval_undoes_the_resamples_pull_towards_zero():
    # Resamples repeat a third of their pairs: the extra small-sample bias in both sets shrinks every
    # resampled ratio towards 0. The basic interval reflects the resamples about the estimate, so it
    # sits on the far side of it from 0, where the plain percentiles would sit on the near side.
    from diffexp.research.paired import relative_differences

    generator = torch.Generator().manual_seed(1)
    real = torch.randn(2000, 32, generator=generator)
    fake = torch.randn(400, 32, generator=generator) + 0.05
    logits = torch.zeros(len(fake), 10)
    worse = relative_differences(real, None, (fake, logits), (fake * 1.1, logits), resamples=200)["fd"]
    middle = (worse["low"] + worse["high"]) / 2
    assert 0 < worse["relative"] < middle
