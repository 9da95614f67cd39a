"""The three training objectives: their targets and weights against the papers' formulas on fixed
tensors, and each one end to end (train, resume exactly, export, reload in plain diffusers, sample)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config, crashed_copy, run_train
from omegaconf import OmegaConf

from diffexp.models.build import build_objective, build_sampler
from diffexp.sampling.generate import network_evaluations, sample_run

torch.manual_seed(0)
CLEAN = torch.rand(4, 1, 8, 8) * 2 - 1
NOISE = torch.randn(4, 1, 8, 8)


def objective(*overrides: str):
    cfg = compose_config(list(overrides))
    return build_objective(cfg.scheduler, cfg.trainer)


def test_ddpm_targets_and_min_snr_weights_are_the_papers():
    obj = objective("scheduler=cosine", "scheduler.prediction_type=v_prediction", "trainer.loss_weighting=min_snr",
                    "trainer.snr_gamma=5")
    t = torch.tensor([0, 100, 500, 999])
    abar = obj.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    batch = obj.noise(CLEAN, NOISE, t)
    torch.testing.assert_close(batch.model_input, abar.sqrt() * CLEAN + (1 - abar).sqrt() * NOISE)
    torch.testing.assert_close(batch.target, abar.sqrt() * NOISE - (1 - abar).sqrt() * CLEAN)  # Salimans & Ho 2022
    snr = (abar / (1 - abar)).flatten()
    torch.testing.assert_close(batch.weight, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))  # Hang et al. 2023


def test_ddpm_logit_normal_timesteps_follow_their_density():
    """``trainer.time_distribution=logit_normal``: the integer part of T sigmoid(N(m, s^2)), checked against
    its CDF; uniform stays uniform."""
    from scipy.stats import norm

    torch.manual_seed(0)
    t = objective("trainer.time_distribution=logit_normal", "trainer.logit_mean=-0.5", "trainer.logit_std=1.2") \
        .noise(torch.zeros(200_000, 1, 1, 1)).timestep
    assert t.dtype == torch.long and 0 <= t.min() and t.max() <= 999
    for k in (100, 300, 500, 700, 900):  # P(t < k) = P(logit(U) < logit(k / T))
        expected = norm.cdf((np.log(k / (1000 - k)) + 0.5) / 1.2)
        assert (t < k).double().mean().item() == pytest.approx(expected, abs=0.005)
    u = objective().noise(torch.zeros(200_000, 1, 1, 1)).timestep
    assert (u < 300).double().mean().item() == pytest.approx(0.3, abs=0.005)


@pytest.mark.parametrize(("overrides", "steps", "nfe"), [
    (["scheduler=edm", "sampler=edm_heun"], 18, 35),  # EDM's Heun: 35 NFE for 18 steps on CIFAR-10 (Karras et al. 2022)
    (["scheduler=flow_matching", "sampler=fm_heun"], 10, 19),
    (["scheduler=flow_matching", "sampler=fm_euler"], 10, 10),
    (["scheduler=flow_matching"], 20, 20),  # its default, dpmpp_sde on the flow path
    (["scheduler=edm"], 20, 20),  # its default, edm_dpmpp_sde
    (["sampler=dpmpp_sde"], 20, 20),
    (["sampler=ddpm"], 1000, 1000),
])
def test_network_evaluations_count_each_call_of_the_network(overrides, steps, nfe):
    cfg = compose_config(overrides)
    assert network_evaluations(build_sampler(cfg.sampler, cfg.scheduler), steps) == nfe


def test_flow_matching_path_target_and_times_are_the_papers():
    obj = objective("scheduler=flow_matching")
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    batch = obj.noise(CLEAN, NOISE, t)
    t4 = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(batch.model_input, (1 - t4) * CLEAN + t4 * NOISE)
    torch.testing.assert_close(batch.target, NOISE - CLEAN)  # d x_t / dt
    torch.testing.assert_close(batch.timestep, t * 1000)
    assert batch.weight is None
    torch.manual_seed(1)
    times = obj.times(200_000, torch.device("cpu"))
    logit = torch.log(times / (1 - times))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01  # SD3's logit-normal(0, 1)
    shifted = objective("scheduler=flow_matching", "scheduler.shift=3", "scheduler.time_distribution=uniform")
    torch.manual_seed(2)
    u = torch.rand(5)
    torch.manual_seed(2)
    torch.testing.assert_close(shifted.times(5, torch.device("cpu")), 3 * u / (1 + 2 * u))


def test_edm_preconditioning_and_loss_are_the_papers():
    """Karras et al. 2022, Table 1: with F any network output, lambda(sigma) |D(x; sigma) - x_0|^2 is
    the objective's weight x |F - target|^2, and F sees c_in x and c_noise."""
    obj = objective("scheduler=edm")
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0])
    batch = obj.noise(CLEAN, NOISE, sigma)
    s, sd = sigma.reshape(-1, 1, 1, 1).double(), 0.5
    x = CLEAN.double() + s * NOISE.double()
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (sd**2 + s**2).sqrt(), sigma.double().log() / 4
    lam = (s**2 + sd**2) / (s * sd) ** 2
    torch.testing.assert_close(batch.model_input.double(), c_in * x, rtol=1e-5, atol=1e-6)  # float32 against float64
    torch.testing.assert_close(batch.timestep.double(), c_noise)
    F = torch.randn(4, 1, 8, 8).double()
    paper = (lam * (c_skip * x + c_out * F - CLEAN.double()) ** 2).mean(dim=(1, 2, 3))
    ours = ((F - batch.target.double()) ** 2).mean(dim=(1, 2, 3)) * (1 if batch.weight is None else batch.weight)
    torch.testing.assert_close(ours, paper, rtol=1e-4, atol=1e-6)
    torch.manual_seed(3)
    levels = obj.sigmas(200_000, torch.device("cpu")).log()
    assert abs(levels.mean().item() + 1.2) < 0.01 and abs(levels.std().item() - 1.2) < 0.01  # P_mean, P_std


@pytest.mark.parametrize("overrides,expected", [
    (["scheduler=edm", "scheduler.prediction_type=v_prediction"],
     "scheduler.prediction_type=v_prediction: EDM trains its own preconditioned target"),
    (["scheduler=flow_matching", "scheduler.prediction_type=epsilon"],
     "scheduler.prediction_type=epsilon: flow matching always predicts the velocity"),
    (["scheduler=flow_matching", "sampler=ddim"],
     "sampler=DDIMScheduler: cannot sample a model trained with FlowMatching"),
    (["scheduler=edm", "sampler=fm_euler"], "sampler=FlowMatchEulerDiscreteScheduler: cannot sample a model trained with EDM"),
    (["scheduler=linear", "sampler=edm_heun"], "sampler=EDMHeunScheduler: cannot sample a model trained with DDPMScheduler"),
    (["scheduler=edm", "trainer.loss_weighting=min_snr"], "trainer.loss_weighting=min_snr: min-SNR weighting is for the DDPM family"),
    (["scheduler=flow_matching", "scheduler.time_distribution=beta"], "scheduler.time_distribution=beta: expected one of"),
    (["trainer.time_distribution=beta"], "trainer.time_distribution=beta: expected one of uniform, logit_normal"),
    (["trainer.time_distribution=logit_normal", "trainer.logit_std=0"], "trainer.logit_std=0: expected a positive number"),
    (["scheduler=edm", "trainer.time_distribution=logit_normal"],
     "trainer.time_distribution=logit_normal: the DDPM family's timestep density"),
    (["trainer.lr_schedule=wsd", "trainer.cooldown=0"], "trainer.cooldown=0: expected"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(train, overrides, expected):
    run, result = train(*overrides, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(f"error: {expected}")
    assert not (run / "run.json").exists()


README_SNIPPET = """
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(MODEL_DIR, trust_remote_code=True)
images = pipe(batch_size=4, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np").images
"""


@pytest.mark.gpu
@pytest.mark.parametrize("scheduler", ["linear", "flow_matching", "edm"])
def test_each_objective_trains_resumes_exactly_exports_and_samples(scheduler, train, tmp_path):
    common = [f"scheduler={scheduler}", "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.log_every=2",
              "trainer.keep_checkpoints=10", "trainer.sample_every=0"]
    full, _ = train(*common, name="full")
    crashed = crashed_copy(full, tmp_path / "crashed", checkpoint=4, logged=2)
    run_train(f"resume={crashed}")
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(crashed)[-1]["step"] == 6 and [r.get("train/loss") for r in rows(crashed)] == \
        [r.get("train/loss") for r in rows(full)]
    cfg = OmegaConf.load(full / "config.yaml")
    # the README's snippet, as a user runs it
    scope = {"MODEL_DIR": str(full / "model"), "STEPS": cfg.sampler.steps}
    exec(README_SNIPPET, scope)
    images = np.round(scope["images"] * 255).astype(np.uint8)
    assert images.shape == (4, 8, 8, 1)
    assert np.array_equal(images, sample_run(full, n=4, seed=0).images)  # the same images as `sample`
    assert np.array_equal(images, sample_run(crashed, n=4, seed=0).images)  # and the resumed run's weights are the same
    assert cfg.sampler.name == {"linear": "dpmpp_sde", "flow_matching": "dpmpp_sde", "edm": "edm_dpmpp_sde"}[scheduler]


def test_an_objective_is_a_peer_of_the_others_in_the_loop():
    """The loop asks every objective the same thing; the config names its class."""
    for scheduler in ("linear", "flow_matching", "edm"):
        obj = objective(f"scheduler={scheduler}")
        batch = obj.noise(CLEAN)
        assert batch.model_input.shape == CLEAN.shape == batch.target.shape and batch.timestep.shape == (4,)
        sampler = build_sampler(compose_config([f"scheduler={scheduler}"]).sampler, compose_config([f"scheduler={scheduler}"]).scheduler)
        assert type(sampler).__name__ in obj.compatible_samplers
