"""``python -m diffexp.sample run=RUN_DIR n=64 [sampler=ddim] [sampler.steps=50] seed=0 out=FILE.npz``.

Images from a run's EMA weights (its exported ``model/``): ``FILE.npz`` holds ``images`` (uint8,
N x H x W x C) and a grid PNG is written beside it. Without ``sampler=...`` the run's own sampler
is used (``sampler.steps=N`` alone changes only its step count). ``guide=RUN``/``guide_checkpoint=STEP``
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


def out_path(cfg: DictConfig, run: RunDir, sampler: str, steps: int) -> Path:
    """Where the images go: ``out`` (an .npz, checked by ``check_sample_config``), else RUN_DIR/samples/sample_<sampler>_<steps>steps_s<seed>.npz."""
    if cfg.out:
        return Path(str(cfg.out)).expanduser()
    return run.samples_dir / f"sample_{sampler}_{steps}steps_s{cfg.seed}.npz"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    from diffexp.sampling.generate import sample_run, save_samples

    with report_errors():
        check_sample_config(cfg)
        run = RunDir(cfg.run).require()
        samples = sample_run(run, n=int(cfg.n), seed=int(cfg.seed), sampler_cfg=cfg.sampler,
                             batch_size=int(cfg.batch_size), class_label=cfg.class_label,
                             guidance_scale=cfg.guidance_scale, guide=cfg.guide, guide_checkpoint=cfg.guide_checkpoint,
                             guidance_interval=cfg.guidance_interval, progress=True)
        out = out_path(cfg, run, samples.sampler, samples.steps)
        grid_file = save_samples(samples, out)
        print(f"{len(samples.images)} images {samples.images.shape[1:]} -> {out} (grid {grid_file})", flush=True)


if __name__ == "__main__":
    main()
