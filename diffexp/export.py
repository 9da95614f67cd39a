"""``python -m diffexp.export run=RUN_DIR [checkpoint=STEP|last|best] [out=DIR]``: a run's weights as a
diffusers pipeline folder.

Writes what training writes to ``model/`` (``sampling.export.export_pipeline``: the EMA weights, the
run's sampler and, for latent diffusion, the autoencoder), here for any complete checkpoint, so an
earlier or the best checkpoint loads like the final model:
``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`` (a plain ``DDPMPipeline`` folder
for an unconditional pixel-space U-Net with a DDPM-family sampler). Without ``checkpoint=`` the run's
``model/`` (an interrupted run: its newest complete checkpoint). ``out`` defaults to
``RUN_DIR/exports/step_XXXXXXX``; an existing ``out`` is replaced only if it is such a folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffexp import DiffexpError
from diffexp.config import CONFIG_PATH, need_checkpoint, report_errors
from diffexp.records.rundir import STEP_DIR, RunDir

log = logging.getLogger("diffexp.export")


def out_dir(cfg: DictConfig, run: RunDir, step: int) -> Path:
    """Where the pipeline goes: ``out``, else RUN_DIR/exports/step_XXXXXXX; refused in one line when
    it is the run's own ``model/`` or an existing folder that is no exported pipeline."""
    out = Path(str(cfg.out)).expanduser().resolve() if cfg.out else run.path / "exports" / STEP_DIR.format(step)
    if out == run.model_dir:
        raise DiffexpError(f"out={cfg.out}: is the run's own model/ (training writes it); choose another folder")
    if out.exists() and not (out / "model_index.json").is_file():
        raise DiffexpError(f"out={cfg.out}: exists and is not an exported pipeline (no model_index.json); "
                           "choose a new folder")
    return out


def export(cfg: DictConfig) -> tuple[Path, int | None]:
    """Write the pipeline of ``cfg.run``'s weights that ``cfg.checkpoint`` names; returns its folder and
    the checkpoint step it holds (None: ``model/``)."""
    from diffexp.models.build import build_sampler, resolve_sampler
    from diffexp.sampling.export import export_pipeline
    from diffexp.sampling.generate import load_run_model

    need_checkpoint(cfg)
    run = RunDir(cfg.run).require()
    model = load_run_model(run, "cpu", cfg.checkpoint, metric_key=cfg.metric_key)
    out = out_dir(cfg, run, model.step)
    sampler = build_sampler(resolve_sampler(model.cfg.sampler, model.cfg.scheduler), model.cfg.scheduler,
                            latent=model.vae is not None)
    export_pipeline(model.denoiser, sampler, run, vae=model.vae, class_names=model.names, out=out)
    return out, model.checkpoint


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    with report_errors():
        out, checkpoint = export(cfg)
    print(f"exported {cfg.run} ({'model/' if checkpoint is None else f'checkpoint {checkpoint}'}) -> {out}", flush=True)


if __name__ == "__main__":
    main()
