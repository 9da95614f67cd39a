"""Every config in conf/ composes, and every library object it names instantiates."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from diffexp import DiffexpError
from diffexp.config import CONFIG_PATH
from diffexp.models.build import build_lr_scheduler, build_model, build_noise_scheduler, build_optimizer, build_sampler

CONF = Path(CONFIG_PATH)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@functools.cache
def _sampler_node(name: str):
    return composed(f"sampler={name}").sampler


def sampler_node(name: str):
    """``sampler=name`` as composed, each option composed once per module (a copy each call)."""
    return _sampler_node(name).copy()


@pytest.mark.parametrize("group", ["model", "scheduler", "sampler", "dataset", "metric", "logger", "trainer",
                                   "experiment", "debug"])
def test_every_option_of_every_group_composes(group):
    assert options(group), f"conf/{group}/ is empty"
    for option in options(group):
        cfg = composed(f"{group}={option}")
        OmegaConf.to_container(cfg.trainer, resolve=True)  # trainer values all resolve


@pytest.mark.parametrize("model", options("model"))
def test_models_instantiate_at_their_size(model):
    resolution = 32 if model in ("unet_base", "unet_large") else 16
    cfg = composed(f"model={model}", f"dataset.resolution={resolution}")
    unet = build_model(cfg.model)
    n = sum(p.numel() for p in unet.parameters())
    # DiT-S/2 and B/2 at the paper's widths and depths (33M and 130M there; diffusers' blocks are a little
    # larger); dit_xs2 matches unet_small (2.7M) for the backbone comparison.
    expected = {"unet_tiny": (0, 1e6), "unet_small": (1e6, 5e6), "unet_base": (35.6e6, 35.8e6), "unet_large": (1e8, 1.2e8),
                "dit_xs2": (2.5e6, 3.1e6), "dit_s2": (30e6, 40e6), "dit_b2": (125e6, 145e6)}
    low, high = expected[model]
    assert low < n < high, f"{model}: {n} parameters"
    assert unet.config.sample_size == resolution and unet.config.in_channels == cfg.dataset.channels


def test_unet_base_is_the_ddpm_cifar10_network():
    cfg = composed("experiment=ddpm_cifar10")
    unet = build_model(cfg.model)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(35.7e6, rel=0.002)
    assert unet.config.block_out_channels == [128, 256, 256, 256] and unet.config.layers_per_block == 2
    assert unet.config.dropout == 0.1 and unet.config.sample_size == 32 and unet.config.in_channels == 3
    t = cfg.trainer
    assert (t.lr, t.batch_size, t.ema.decay, t.warmup_steps, t.max_steps) == (2e-4, 128, 0.9999, 5000, 800_000)
    assert cfg.dataset.random_flip and cfg.scheduler.beta_schedule == "linear"


DDPM_FAMILY = [o for o in options("scheduler") if o not in ("flow_matching", "edm")]


@pytest.mark.parametrize("scheduler", DDPM_FAMILY)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_schedules_and_their_samplers_instantiate(scheduler, prediction_type):
    cfg = composed(f"scheduler={scheduler}", f"scheduler.prediction_type={prediction_type}",
                   "scheduler.rescale_betas_zero_snr=true")
    noise_scheduler = build_noise_scheduler(cfg.scheduler)
    assert noise_scheduler.config.prediction_type == prediction_type
    assert noise_scheduler.alphas_cumprod[-1] < 1e-6  # zero terminal SNR
    for sampler in options("sampler"):
        sampler_cfg = sampler_node(sampler)
        if sampler.startswith(("fm_", "edm_")):
            with pytest.raises(DiffexpError, match="cannot sample a model trained with DDPMScheduler"):
                build_sampler(sampler_cfg, cfg.scheduler)
            continue
        inference = build_sampler(sampler_cfg, cfg.scheduler)
        inference.set_timesteps(sampler_cfg.steps or 10)
        assert inference.config.prediction_type == prediction_type
        # the sampler integrates the schedule the model was trained on, whatever it can compute itself
        torch.testing.assert_close(inference.alphas_cumprod, noise_scheduler.alphas_cumprod)


@pytest.mark.parametrize("scheduler,prefixes", [("flow_matching", ("fm_", "dpmpp")), ("edm", ("edm_",))])
def test_flow_matching_and_edm_take_their_own_samplers_only(scheduler, prefixes):
    cfg = composed(f"scheduler={scheduler}", *(["scheduler.shift=3.0"] if scheduler == "flow_matching" else []))
    for sampler in options("sampler"):
        sampler_cfg = sampler_node(sampler)
        if sampler.startswith(prefixes) or sampler == "auto":
            inference = build_sampler(sampler_cfg, cfg.scheduler)
            inference.set_timesteps(sampler_cfg.steps or 10)
            assert len(inference.timesteps) >= (sampler_cfg.steps or 10)
            if sampler.startswith("dpmpp") or (scheduler, sampler) == ("flow_matching", "auto"):
                # DPM-Solver++ on the flow path: flow sigmas, the velocity, the training's shift
                assert (inference.config.use_flow_sigmas, inference.config.prediction_type,
                        inference.config.flow_shift) == (True, "flow_prediction", 3.0)
                assert inference.sigmas[0] == pytest.approx(3 * 0.999 / (1 + 2 * 0.999), abs=1e-4)
        else:
            with pytest.raises(DiffexpError, match="cannot sample a model trained with"):
                build_sampler(sampler_cfg, cfg.scheduler)


def test_linear_schedule_is_the_ddpm_papers():
    s = build_noise_scheduler(composed("scheduler=linear").scheduler)
    assert s.config.num_train_timesteps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)


def test_optimizer_and_lr_schedule_follow_the_trainer_config():
    cfg = composed("trainer.lr=3e-4", "trainer.warmup_steps=10", "trainer.max_steps=100", "trainer.lr_schedule=linear")
    opt = build_optimizer(cfg.trainer, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"))
    sched = build_lr_scheduler(cfg.trainer, opt)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 3e-4
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["fused"] is True  # fused_adamw: auto on a CPU
    for _ in range(10):
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(3e-4)


def test_wsd_warms_up_holds_and_cools_down_linearly_over_the_last_fraction():
    cfg = composed("trainer.lr=1e-3", "trainer.warmup_steps=10", "trainer.max_steps=100", "trainer.lr_schedule=wsd",
                   "trainer.cooldown=0.2")
    opt = build_optimizer(cfg.trainer, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"))
    sched = build_lr_scheduler(cfg.trainer, opt)
    lr = []
    for _ in range(100):
        lr.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lr[0] == 0 and lr[5] == pytest.approx(5e-4) and lr[10] == lr[79] == pytest.approx(1e-3)  # diffusers' warm-up
    assert lr[80] == pytest.approx(1e-3) and lr[90] == pytest.approx(5e-4) and lr[99] == pytest.approx(5e-5)
    assert all(a > b for a, b in zip(lr[80:], lr[81:]))  # linear to 0 at step 100


def test_contract_trainer_keys_exist():
    t = composed().trainer
    for key in ("max_steps", "batch_size", "lr", "mixed_precision", "log_every", "sample_every", "eval_every",
                "checkpoint_every", "grad_accum", "max_grad_norm", "ema", "loss_weighting", "keep_checkpoints"):
        assert key in t, key
    assert t.max_grad_norm == 1.0


def test_sampler_options_given_with_auto_apply_to_the_objectives_own_sampler():
    cfg = composed("+sampler.scheduler.thresholding=false")
    sampler = build_sampler(cfg.sampler, cfg.scheduler)
    assert type(sampler).__name__ == "DPMSolverMultistepScheduler"
    assert sampler.config.algorithm_type == "sde-dpmsolver++" and sampler.config.thresholding is False
    assert build_sampler(composed().sampler, cfg.scheduler).config.thresholding is True
