"""``python -m diffexp.sample run=RUN_DIR n=64 [sampler=ddim] [sampler.steps=50] seed=0 [checkpoint=STEP|last|best] out=FILE.npz``.

Images from a run's EMA weights (its exported ``model/``, or with ``checkpoint=`` any complete
checkpoint's, or with ``ema_std=`` a post-hoc EMA): ``FILE.npz`` holds ``images`` (uint8,
N x H x W x C) and a grid PNG is written beside it. Without ``sampler=...`` the run's own sampler is
used (``sampler.steps=N`` alone changes only its step count). ``guide=RUN``/``guide_checkpoint=STEP``
autoguide with weight ``guidance_scale``; ``guidance_interval=[lo,hi]`` limits guidance to part of the
trajectory (docs/guidance.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffexp.config import CONFIG_PATH, check_sample_config, report_errors
from diffexp.records.rundir import RunDir

log = logging.getLogger("diffexp.sample")


def out_path(cfg: DictConfig, run: RunDir, sampler: str, steps: int, checkpoint: int | None = None) -> Path:
    """Where the images go: ``out`` (an .npz, checked by ``check_sample_config``), else
    RUN_DIR/samples/sample_<sampler>_<steps>steps[_ema<ema_std>]_s<seed>[_ckpt<STEP>].npz."""
    if cfg.out:
        return Path(str(cfg.out)).expanduser()
    ema = f"_ema{cfg.ema_std:g}" if cfg.get("ema_std") is not None else ""
    at = "" if checkpoint is None else f"_ckpt{checkpoint}"
    return run.samples_dir / f"sample_{sampler}_{steps}steps{ema}_s{cfg.seed}{at}.npz"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    from diffexp.sampling.generate import sample_run, save_samples

    with report_errors():
        check_sample_config(cfg)
        run = RunDir(cfg.run).require()
        samples = sample_run(run, n=int(cfg.n), seed=int(cfg.seed), sampler_cfg=cfg.sampler,
                             batch_size=int(cfg.batch_size), class_label=cfg.class_label,
                             guidance_scale=cfg.guidance_scale, guide=cfg.guide, guide_checkpoint=cfg.guide_checkpoint,
                             guidance_interval=cfg.guidance_interval, progress=True, checkpoint=cfg.checkpoint,
                             metric_key=cfg.metric_key, ema_std=cfg.get("ema_std"))
        out = out_path(cfg, run, samples.sampler, samples.steps, samples.checkpoint)
        grid_file = save_samples(samples, out)
        print(f"{len(samples.images)} images {samples.images.shape[1:]} -> {out} (grid {grid_file})", flush=True)


if __name__ == "__main__":
    main()
