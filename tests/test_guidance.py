"""Autoguidance and the guidance interval in ``DiffexpPipeline``, on small random networks (exact
identities need no training), the exported pipeline carrying its guide, and which guides a run
accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel
from omegaconf import OmegaConf

from diffexp.records.rundir import RunDir
from diffexp.sampling.export import export_pipeline, load_pipeline
from diffexp.sampling.generate import guide_mismatch, make_pipeline
from diffexp.sampling.pipeline import in_interval

STEPS = 4


def tiny_unet(seed: int, num_classes: int | None = None) -> UNet2DModel:
    """A random 8 px U-Net (class-conditional with a null class when ``num_classes``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                           norm_num_groups=4, num_class_embeds=num_classes + 1 if num_classes else None).eval()


def images(unet, *, guide=None, num_classes=None, **kwargs) -> np.ndarray:
    pipe = make_pipeline(unet, DDIMScheduler(beta_schedule="squaredcos_cap_v2"), num_classes=num_classes, guide=guide)
    labels = [3, 7] if num_classes else None
    return pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                class_labels=labels, output_type="np", **kwargs).images


@pytest.mark.parametrize("num_classes", [None, 10])
def test_autoguidance_at_w_1_is_the_unguided_model_and_a_weaker_guide_changes_it(num_classes):
    main, weak = tiny_unet(0, num_classes), tiny_unet(1, num_classes)
    plain = images(main, num_classes=num_classes)
    assert np.array_equal(images(main, guide=weak, num_classes=num_classes, guidance_scale=1.0), plain)
    assert not np.allclose(images(main, guide=weak, num_classes=num_classes, guidance_scale=2.0), plain, atol=1e-3)
    # D_guide + w (D_main - D_guide) with D_guide = D_main is D_main for any w; for a class-conditional model
    # this also shows that a guide replaces classifier-free guidance (which would change the images at w=2)
    assert np.array_equal(images(main, guide=main, num_classes=num_classes, guidance_scale=2.0), plain)


def test_the_guidance_interval_guides_only_its_part_of_the_trajectory():
    assert [in_interval(i, 4, (0.25, 0.75)) for i in range(4)] == [False, True, True, False]
    assert all(in_interval(i, 4, (0.0, 1.0)) for i in range(4))
    assert not any(in_interval(i, 4, (0.5, 0.5)) for i in range(4))
    net = tiny_unet(0, 10)
    cfg = images(net, num_classes=10, guidance_scale=3.0)
    unguided = images(net, num_classes=10, guidance_scale=1.0)
    assert np.array_equal(images(net, num_classes=10, guidance_scale=3.0, guidance_interval=(0.0, 1.0)), cfg)
    assert np.array_equal(images(net, num_classes=10, guidance_scale=3.0, guidance_interval=(0.5, 0.5)), unguided)
    middle = images(net, num_classes=10, guidance_scale=3.0, guidance_interval=(0.25, 0.75))
    assert not np.allclose(middle, cfg, atol=1e-3) and not np.allclose(middle, unguided, atol=1e-3)


def test_the_exported_pipeline_carries_its_guide(tmp_path):
    main, weak = tiny_unet(0), tiny_unet(1)
    sampler = DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    export_pipeline(main, sampler, RunDir(tmp_path), guide=weak)
    expected = images(main, guide=weak, guidance_scale=2.0, guidance_interval=(0.2, 0.9))
    ours = load_pipeline(tmp_path / "model")
    plain = DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True)  # what a user loads
    for pipe in (ours, plain):
        assert type(pipe.guide).__name__ == "UNet2DModel"
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                   guidance_scale=2.0, guidance_interval=(0.2, 0.9), output_type="np").images
        assert np.array_equal(out, expected)


def changed(cfg, **settings):
    """A copy of run config ``cfg`` with dotted keys (``dataset__resolution``) set."""
    cfg = cfg.copy()
    for key, value in settings.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def test_a_guide_must_model_the_same_data_the_same_way():
    run = compose_config(["debug=tiny"])
    digits = [str(i) for i in range(10)]
    smaller = changed(run, model__block_out_channels=[8, 16], trainer__max_steps=2)
    assert guide_mismatch(run, None, smaller, None) is None  # a smaller or shorter-trained model: the point of a guide
    assert guide_mismatch(run, None, changed(run, dataset__resolution=16), None) == "its resolution is 16, the run's 8"
    conditional = changed(run, conditioning__kind="class")
    assert guide_mismatch(run, None, conditional, digits) == "its conditioning is class, the run's none"
    assert guide_mismatch(conditional, digits, conditional, digits[:5]).startswith(
        "its classes are 5 classes (0, 1, 2, ...), the run's 10 classes")
    assert guide_mismatch(run, None, changed(run, scheduler__prediction_type="v_prediction"), None) == \
        "its prediction type is v_prediction, the run's epsilon"
    assert guide_mismatch(run, None, changed(run, scheduler___target_="diffexp.objectives.edm.EDM"), None) == \
        "its objective is diffexp.objectives.edm.EDM, the run's diffusers.DDPMScheduler"
