"""``python -m diffexp.evaluate run=RUN_DIR [overrides]``: sample quality of a run's model or checkpoints.

Examples::

    python -m diffexp.evaluate run=outputs/2026-11-26/10-00-00_unet_small-linear-s0       # the dataset's metric
    python -m diffexp.evaluate run=RUN_DIR metric=fid_is_kid metric.num_samples=50000 sampler=ddpm
    python -m diffexp.evaluate -m run=RUN_DIR sampler=ddim,dpmpp sampler.steps=10,20,50   # several samplers
    python -m diffexp.evaluate -m run=RUN_DIR checkpoint=500,1000,1500 guidance_scale=1,1.5 seed=0,1,2  # a sweep
    accelerate launch -m diffexp.evaluate run=RUN_DIR                                       # several GPUs
    python -m diffexp.evaluate run=RUN_DIR images=FILE.npz                 # images made elsewhere
    python -m diffexp.evaluate -m run=RUN_DIR guide_checkpoint=500 guidance_scale=1,2,3   # autoguidance

Every result is kept in ``RUN_DIR/eval.json``, keyed by its setting (``setting``: the weights'
checkpoint and post-hoc EMA width, sampler, options, steps, guidance, guide and guidance interval,
sampling seed, metric and sample count; the same setting again replaces its own entry: it is the
same measurement); the result is also printed as JSON on the last line. Images are scored as they
are drawn and never written, so a sweep over settings (``-m``) costs no disk; every setting draws
from the same sampling seed (``seed=``, default ``metric.seed``), so settings differ only in what they set.

``images=FILE.npz`` scores the images in that file instead of sampling the run (all of them; an
``.npz`` as ``sample`` writes it: ``images``, uint8 N x H x W x C, at the run's resolution and channels,
and for a class-conditional run ``labels``) against the run's dataset with the same metrics. That
result is printed only: the images need not be the run's, so eval.json does not keep it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from diffexp import DiffexpError
from diffexp.config import CONFIG_PATH, check_evaluate_config, report_errors
from diffexp.records.rundir import RunDir, file_sha256, now
from diffexp.records.tracking import add_to_wandb_summary

log = logging.getLogger("diffexp.evaluate")


def setting(model, metric_cfg: DictConfig, sampler_cfg: DictConfig, steps: int, guidance: float | None,
            ema_std: float | None, num_samples: int, guide: str | None = None, guide_checkpoint=None,
            interval=None) -> dict:
    """What an evaluation result is keyed by (its ``key`` in eval.json): which weights (``checkpoint``: a
    step, None for ``model/``; ``ema_std``, a post-hoc EMA width), the sampler, its options and steps,
    the guidance scale, guide and interval, the sampling seed, and the metric with its sample count. An
    unset field (None) is left out of the comparison, so results recorded before it existed keep their
    setting. One more axis of evaluation is one more line here; ``compare`` and the W&B table show any
    key field that varies."""
    from diffexp.sampling.generate import sampler_name

    return {
        "checkpoint": model.checkpoint,
        "ema_std": ema_std,
        "sampler": sampler_name(sampler_cfg),
        "sampler_options": OmegaConf.to_container(sampler_cfg.scheduler, resolve=True),
        "sampler_steps": steps,
        "guidance_scale": guidance,
        "guide": guide,
        "guide_checkpoint": guide_checkpoint,
        "guidance_interval": None if interval is None else list(interval),
        "seed": int(metric_cfg.seed),
        "metric": metric_id(metric_cfg),
        "num_samples": num_samples,
    }


def record_result(run: RunDir, result: dict) -> list[dict]:
    """Add ``result`` to the run's eval.json (replacing the entry with the same setting, its ``key``
    fields); returns all results."""
    return run.keep_result(run.eval_file, result, tuple(result["key"]))


def metric_id(metric_cfg: DictConfig) -> str:
    """How a result names its (resolved) metric config: its name, ``auto:<network>`` for ``metric=auto``."""
    return metric_cfg.name if metric_cfg.name != "auto" else f"auto:{metric_cfg.network}"


def images_file(path: str, dataset_cfg: DictConfig) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``(images, labels or None, sha256 of the file)`` of an ``.npz`` as ``sample`` writes it, refused in
    one line unless its images are uint8 N x H x W x C at the dataset's resolution and channels."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DiffexpError(f"images={path}: no such file (an .npz as python -m diffexp.sample writes)")
    try:
        data = np.load(file)
    except (ValueError, OSError) as e:
        raise DiffexpError(f"images={path}: not an .npz file ({e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy: one array, no names
        raise DiffexpError(f"images={path}: not an .npz file (one {type(data).__name__}; save it with "
                           "np.savez(FILE, images=...))")
    with data:
        arrays = {k: data[k] for k in data.files}
    if "images" not in arrays:
        raise DiffexpError(f"images={path}: the file has no 'images' array (it has {sorted(arrays)})")
    images, labels = arrays["images"], arrays.get("labels")
    size, channels = int(dataset_cfg.resolution), int(dataset_cfg.channels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, channels):
        raise DiffexpError(f"images={path}: expected uint8 images of {size}x{size}x{channels} (the run's "
                           f"dataset), got {images.dtype} {'x'.join(map(str, images.shape))}")
    if labels is not None and labels.shape != (len(images),):
        raise DiffexpError(f"images={path}: 'labels' has shape {labels.shape}, expected one per image ({len(images)})")
    return images, labels, file_sha256(file)


def evaluate_file(cfg: DictConfig) -> dict | None:
    """Score the images of ``cfg.images`` against the dataset of ``cfg.run`` with its metric; the main
    process gets the result (others None), nothing is recorded."""
    from accelerate import Accelerator

    from diffexp.data.datasets import load_images
    from diffexp.quality.evaluator import Evaluator, resolve_metric
    from diffexp.sampling.generate import class_names

    run = RunDir(cfg.run).require()
    run_cfg = run.config()
    images, labels, digest = images_file(str(cfg.images), run_cfg.dataset)
    try:  # the file's count is the sample count: the metrics' own checks apply to it (pr_k < count, ...)
        metric_cfg = resolve_metric(OmegaConf.merge(cfg.metric, {"num_samples": len(images)}), run_cfg.dataset)
    except DiffexpError as e:
        raise DiffexpError(f"images={cfg.images} ({len(images)} images): {e}") from None
    names = class_names(run)
    if labels is not None and names and not ((labels >= 0) & (labels < len(names))).all():
        raise DiffexpError(f"images={cfg.images}: labels outside the run's classes 0..{len(names) - 1}")
    accelerator = Accelerator()
    with accelerator.main_process_first():
        real = load_images(run_cfg.dataset, cfg.cache_dir)
    evaluator = Evaluator(metric_cfg, accelerator, real, run_cfg.dataset, cfg.cache_dir)
    scores = evaluator.score_images(images, labels if names else None)
    result = {**scores, "metric": metric_id(metric_cfg), "network": metric_cfg.network, "num_samples": len(images),
              "num_real": evaluator.num_real, "images": str(cfg.images), "images_sha256": digest[:16], "at": now()}
    accelerator.end_training()
    return result if accelerator.is_main_process else None


def evaluate(cfg: DictConfig) -> dict | None:
    """Evaluate the EMA weights of ``cfg.run`` (its ``model/``, or ``cfg.checkpoint``'s); the main process
    records the result in eval.json and gets it (others None)."""
    from accelerate import Accelerator

    from diffexp.data.datasets import load_images
    from diffexp.models.build import build_objective, build_sampler
    from diffexp.quality.evaluator import Evaluator, resolve_metric
    from diffexp.quality.likelihood import describe
    from diffexp.sampling.generate import (
        check_steps,
        choose_guidance,
        choose_interval,
        choose_sampler,
        class_names,
        guide_name,
        load_guide,
        load_run_model,
        network_evaluations,
    )

    if cfg.get("images"):
        return evaluate_file(cfg)
    run = RunDir(cfg.run).require()
    run_cfg = run.config()
    names = class_names(run)
    metric_cfg = resolve_metric(cfg.metric, run_cfg.dataset)
    if cfg.get("seed") is not None:  # the sampling seed: every setting of a sweep draws the same noise
        metric_cfg.seed = int(cfg.seed)
    sampler_cfg, steps = choose_sampler(cfg.sampler, run_cfg)
    guide, guide_checkpoint = cfg.get("guide"), cfg.get("guide_checkpoint")
    guided_by = guide_name(guide, guide_checkpoint)
    guidance = choose_guidance(cfg.guidance_scale, run_cfg, names, guided_by)
    interval = choose_interval(cfg.get("guidance_interval"), names, guided_by)
    accelerator = Accelerator()
    ema_std = cfg.get("ema_std")
    guide_model = load_guide(run, names, guide, guide_checkpoint, accelerator.device)
    model = load_run_model(run, accelerator.device, cfg.checkpoint, metric_key=cfg.metric_key, ema_std=ema_std)
    sampler = build_sampler(sampler_cfg, run_cfg.scheduler, latent=model.vae is not None)
    check_steps(sampler, steps)
    with accelerator.main_process_first():
        real = load_images(run_cfg.dataset, cfg.cache_dir)
    evaluator = Evaluator(metric_cfg, accelerator, real, run_cfg.dataset, cfg.cache_dir)
    objective = build_objective(run_cfg.scheduler, run_cfg.trainer)
    scores = evaluator(model.denoiser, sampler, steps, vae=model.vae, num_classes=len(names) if names else None,
                       guidance_scale=guidance, objective=objective, guide=guide_model, guidance_interval=interval)
    key = setting(model, metric_cfg, sampler_cfg, steps, guidance if names or guided_by else None, ema_std,
                  evaluator.num_samples, str(RunDir(guide).path) if guide is not None else None,
                  guide_checkpoint if guided_by else None, interval)
    result = {**scores, **key, "key": list(key), "step": model.step, "network": metric_cfg.network,
              "num_real": evaluator.num_real, "nfe": network_evaluations(sampler, steps),
              "num_processes": accelerator.num_processes, "at": now()}
    if metric_cfg.get("nll"):
        result["nll"] = describe(metric_cfg, objective)
    main_process = accelerator.is_main_process
    if main_process:
        results = record_result(run, result)
        if cfg.wandb:
            add_to_wandb_summary(run, result, results=results)
    accelerator.end_training()
    return result if main_process else None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with report_errors():
        check_evaluate_config(cfg)
        result = evaluate(cfg)
    if result is not None:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
