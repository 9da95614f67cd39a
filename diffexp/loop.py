"""The training loop, in plainly marked phases: setup, resume, train, snapshot, done.

One optimizer step = ``trainer.grad_accum`` micro-batches on every process; the global batch is
``trainer.batch_size``. Everything a resumed run needs (model, optimizer, LR schedule, EMA, step,
every RNG) is in the accelerate checkpoint, and the data order depends only on (seed, step), so a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, is_compiled_module, set_seed
from diffusers import DDPMPipeline, UNet2DModel
from diffusers.training_utils import EMAModel, compute_snr
from omegaconf import DictConfig
from torch.profiler import record_function as phase
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from diffexp import DiffexpError
from diffexp.build import build_lr_scheduler, build_model, build_noise_scheduler, build_optimizer, build_sampler
from diffexp.data import Batches, center_window, load_images
from diffexp.evaluation import make_evaluator
from diffexp.perf import configure_backends, dynamo_plugin, optimize_model
from diffexp.records import STEP_DIR, RunDir
from diffexp.sampling import generate, save_grid
from diffexp.tracking import check_logger_cfg, make_tracker

log = logging.getLogger(__name__)


class TrainState:
    """Counters saved in every checkpoint (registered with accelerate)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class StridedEMA(EMAModel):
    """diffusers' ``EMAModel``, updated every ``update_every`` optimizer steps instead of every step
    (as ema-pytorch's ``update_every``): each update folds the optimizer steps since the last one into
    the average at once, the old average weighted by the product of their per-step decays, so the
    decay schedule (warm-up, cap, ``update_after_step``) stays in optimizer steps. The difference
    from a per-step EMA is that the skipped steps' weights are represented by the newest ones, which
    is negligible while ``update_every`` is far below the averaging horizon ``1 / (1 - decay)``.

    ``optimization_step`` (saved in checkpoints) is the optimizer step of the last update, so a
    resumed run updates at the same steps as an uninterrupted one.
    """

    _first: int | None = None  # first optimizer step folded into the update in progress

    def catch_up(self, parameters, step: int) -> None:
        """Bring the average up to optimizer step ``step`` (a no-op when it is there already)."""
        if step <= self.optimization_step:
            return
        self._first, self.optimization_step = self.optimization_step + 1, step - 1
        try:
            self.step(parameters)  # advances the counter to ``step`` and asks get_decay(step)
        finally:
            self._first = None

    def get_decay(self, optimization_step: int) -> float:
        decay = 1.0
        for s in range(self._first or optimization_step, optimization_step + 1):
            decay *= super().get_decay(s)
        return decay


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads at a step boundary; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping at the end of this step", signal.Signals(signum).name)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def prediction_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network is trained to output for the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    return clean  # "sample"


def loss_weights(scheduler, timesteps: torch.Tensor, trainer_cfg: DictConfig) -> torch.Tensor | None:
    """Per-sample loss weights: None (uniform) or min-SNR-gamma (Hang et al. 2023)."""
    if trainer_cfg.loss_weighting == "uniform":
        return None
    if trainer_cfg.loss_weighting != "min_snr":
        raise DiffexpError(f"trainer.loss_weighting={trainer_cfg.loss_weighting}: expected uniform or min_snr")
    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=trainer_cfg.snr_gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def due(step: int, every: int, last: int) -> bool:
    """True at every ``every``-th step (0 = never) and at the last step."""
    return step == last or (every > 0 and step % every == 0)


def save_checkpoint(accelerator: Accelerator, run: RunDir, step: int, keep: int) -> Path:
    """Full training state, written to a temporary folder and renamed into place (atomic)."""
    final = run.checkpoint_dir(step)
    tmp = run.checkpoints_dir / f".tmp_{STEP_DIR.format(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step again after a resume: swap, never leave a gap
            stale = final.with_name(final.name + ".old")
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
        run.prune_checkpoints(keep)
    accelerator.wait_for_everyone()
    return final


def follow_optimizer_config(optimizer, lr_scheduler, trainer_cfg: DictConfig) -> dict:
    """After loading a checkpoint: ``trainer.lr``, ``betas``, ``weight_decay`` and ``eps`` come from
    the config (so value overrides on resume apply), the Adam moments and the schedule's position
    from the checkpoint. Returns the settings that changed, as ``{key: (old, new)}``."""
    if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):  # what diffusers' get_scheduler builds
        raise DiffexpError(f"trainer.lr_schedule={trainer_cfg.lr_schedule}: resume expects a LambdaLR schedule")
    wanted = {"initial_lr": float(trainer_cfg.lr), "betas": tuple(float(b) for b in trainer_cfg.betas),
              "weight_decay": float(trainer_cfg.weight_decay), "eps": float(trainer_cfg.eps)}
    changed = {}
    for group, lr_lambda in zip(optimizer.param_groups, lr_scheduler.lr_lambdas):
        for key, value in wanted.items():
            current = tuple(group[key]) if key == "betas" else group[key]
            if current != value:
                changed["lr" if key == "initial_lr" else key] = (current, value)
            group[key] = value
        group["lr"] = wanted["initial_lr"] * lr_lambda(lr_scheduler.last_epoch)  # as LambdaLR computes it
    lr_scheduler.base_lrs = [wanted["initial_lr"]] * len(optimizer.param_groups)
    return changed


def export_pipeline(ema_unet: UNet2DModel, noise_scheduler, run: RunDir) -> None:
    """``model/``: a diffusers DDPMPipeline with the EMA weights (written atomically)."""
    tmp = run.path / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=ema_unet, scheduler=noise_scheduler).save_pretrained(tmp)
    if run.model_dir.exists():
        shutil.rmtree(run.model_dir)
    os.replace(tmp, run.model_dir)


def train(cfg: DictConfig, run_dir: str | None, resume: bool = False) -> str:
    """Train as ``cfg`` says, writing the run directory; returns the final status.

    ``run_dir`` is only read on the main process (the others get it broadcast). Raises
    DiffexpError for bad input and on a non-finite loss (the last good checkpoint is kept).
    """
    tcfg = cfg.trainer
    # ---------------------------------------------------------------- setup
    compile_plugin = dynamo_plugin(tcfg)
    try:
        accelerator = Accelerator(mixed_precision=tcfg.mixed_precision, gradient_accumulation_steps=tcfg.grad_accum,
                                  dynamo_plugin=compile_plugin)
    except ValueError as e:
        raise DiffexpError(f"trainer.mixed_precision={tcfg.mixed_precision}: {e}") from e
    main = accelerator.is_main_process
    run = RunDir(broadcast_object_list([run_dir])[0])
    device = accelerator.device
    configure_backends(tcfg, device)
    set_seed(cfg.seed, device_specific=True)

    checkpoint = None
    if resume:
        checkpoint = run.latest_checkpoint()
        if checkpoint is None:
            raise DiffexpError(f"resume={run.path}: no checkpoint in {run.checkpoints_dir}")

    check_logger_cfg(cfg.logger)  # a bad logger setting fails before anything is recorded
    model = optimize_model(build_model(cfg.model), tcfg)
    noise_scheduler = build_noise_scheduler(cfg.scheduler)
    sampler = build_sampler(cfg.sampler, noise_scheduler)
    with accelerator.main_process_first():
        images = load_images(cfg.dataset, cfg.cache_dir, crop_margin=True)
    batches = Batches(images, batch_size=tcfg.batch_size, grad_accum=tcfg.grad_accum,
                      num_processes=accelerator.num_processes, process_index=accelerator.process_index,
                      seed=cfg.seed, random_flip=cfg.dataset.random_flip, device=device,
                      crop_to=cfg.dataset.resolution)
    optimizer = build_optimizer(tcfg, model.parameters())
    lr_scheduler = build_lr_scheduler(tcfg, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    if tcfg.get("compile", False) and not is_compiled_module(model):  # accelerate keeps a process's first settings
        raise DiffexpError("trainer.compile=true: accelerate did not compile the model (an Accelerator with other "
                           "settings already exists in this process)")
    unwrapped = accelerator.unwrap_model(model)
    ema_every = tcfg.ema.get("update_every", 1)  # configs saved before the option existed: every step
    if not isinstance(ema_every, int) or isinstance(ema_every, bool) or ema_every < 1:
        raise DiffexpError(f"trainer.ema.update_every={ema_every}: expected a positive integer")
    ema = StridedEMA(unwrapped.parameters(), decay=tcfg.ema.decay, use_ema_warmup=tcfg.ema.use_warmup,
                     inv_gamma=tcfg.ema.inv_gamma, power=tcfg.ema.power, update_after_step=tcfg.ema.update_after_step,
                     foreach=True)
    ema_unet = UNet2DModel.from_config(unwrapped.config).to(device).eval().requires_grad_(False)
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler, ema, state)
    n_params = sum(p.numel() for p in unwrapped.parameters())
    # The real set for FID is the center window, whatever random-crop margin training uses.
    evaluator = make_evaluator(cfg, accelerator, center_window(images, cfg.dataset.resolution))

    # ---------------------------------------------------------------- resume
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        log.info("resumed from %s (step %d)", checkpoint, state.step)
        for key, (old, new) in follow_optimizer_config(optimizer, lr_scheduler, tcfg).items():
            log.info("resume: trainer.%s %s -> %s (from the config; moments and schedule position from the checkpoint)",
                     key, old, new)

    # ---------------------------------------------------------------- records
    tracker = None
    if main:
        run.write_config(cfg)
        run.start(cfg, num_processes=accelerator.num_processes, resumed=resume,
                  extra={"num_parameters": n_params, "device": str(device),
                         "mixed_precision": accelerator.mixed_precision})
        if resume:
            run.truncate_metrics(state.step)
        tracker = make_tracker(cfg.logger, cfg, accelerator, run, run.info().get("wandb_run_id"))
        if tracker.run_id:
            run.update_info(wandb_run_id=tracker.run_id)
        log.info("run %s: %s, %.2fM parameters, %d process(es) on %s, batch %d (%d per micro-batch)",
                 run.path, cfg.name, n_params / 1e6, accelerator.num_processes, device, tcfg.batch_size,
                 batches.per_micro)

    def ema_weights() -> UNet2DModel:
        """The EMA model (for samples, evaluation and export; the loop updates the average at those steps)."""
        ema.copy_to(ema_unet.parameters())
        return ema_unet

    def snapshot_samples(step: int) -> None:
        grid_images = generate(ema_weights(), sampler, n=tcfg.grid_size, steps=cfg.sampler.steps, seed=cfg.seed)
        image = save_grid(grid_images, run.sample_grid_file(step))
        tracker.log_image("samples/grid", image, step)

    # ---------------------------------------------------------------- train
    stop = StopRequest()
    status = "failed"
    max_norm = tcfg.max_grad_norm if tcfg.max_grad_norm else math.inf
    T = noise_scheduler.config.num_train_timesteps
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    count, t_last, step, stop_now = 0, time.perf_counter(), state.step, False
    try:
        with logging_redirect_tqdm(), tqdm(total=tcfg.max_steps, initial=state.step, unit="step", disable=not main,
                                           dynamic_ncols=True, desc=cfg.name) as bar:
            for step in range(state.step + 1, tcfg.max_steps + 1):
                model.train()
                for micro in range(tcfg.grad_accum):
                    # Phases are named for `python -m diffexp.bench` (free when no profiler runs).
                    with phase("data"):
                        clean = batches.get(step - 1, micro)
                        noise = torch.randn_like(clean)
                        timesteps = torch.randint(0, T, (clean.shape[0],), device=device)
                        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
                    with accelerator.accumulate(model):
                        with phase("forward_backward"):
                            noise_pred = model(noisy, timesteps).sample
                            target = prediction_target(noise_scheduler, clean, noise, timesteps)
                            per_sample = F.mse_loss(noise_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                            weights = loss_weights(noise_scheduler, timesteps, tcfg)
                            loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
                            accelerator.backward(loss)
                        with phase("optimizer"):
                            if accelerator.sync_gradients:
                                norm_sum += accelerator.clip_grad_norm_(model.parameters(), max_norm).detach()
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                    loss = loss.detach()
                    loss_sum += loss / tcfg.grad_accum
                    nonfinite |= ~torch.isfinite(loss)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                lr_scheduler.step()
                sample_due = due(step, tcfg.sample_every, tcfg.max_steps)
                eval_due = evaluator is not None and tcfg.eval_every > 0 and due(step, tcfg.eval_every, tcfg.max_steps)
                with phase("ema"):
                    # Every process updates at the same steps: its own interval and wherever the
                    # EMA weights are read (samples on the main process, evaluation on all).
                    if due(step, ema_every, tcfg.max_steps) or sample_due or eval_due:
                        ema.catch_up(unwrapped.parameters(), step)
                state.step = step
                count += 1
                bar.update(1)

                checkpoint_due = due(step, tcfg.checkpoint_every, tcfg.max_steps)
                stop_now = bool(stop.signum) and accelerator.num_processes == 1
                with phase("logging"):
                    if due(step, tcfg.log_every, tcfg.max_steps) or checkpoint_due:
                        # The one host-device sync of the loop: losses are read at log steps only.
                        # The stop request rides along, so processes agree on it where they sync anyway.
                        loss_mean, norm_mean, bad, stop_any = accelerator.reduce(torch.stack(
                            [loss_sum / count, norm_sum / count, nonfinite.float(), torch.tensor(float(stop.signum),
                             device=device)]), "mean").tolist()
                        if bad or not math.isfinite(loss_mean):
                            last_good = run.latest_checkpoint()
                            raise DiffexpError(f"non-finite loss at or before step {step}: stopped; last good checkpoint "
                                               f"{last_good if last_good else '(none)'} kept")
                        row = {"step": step, "train/loss": loss_mean, "train/lr": lr,
                               "train/grad_norm": norm_mean,
                               "train/img_per_s": count * tcfg.batch_size / (time.perf_counter() - t_last),
                               "train/step": step, "train/epoch": step / batches.steps_per_epoch}
                        if main:
                            run.append_metrics(row)
                            tracker.log(row, step)
                            bar.set_postfix(loss=f"{loss_mean:.4f}", img_s=f"{row['train/img_per_s']:.0f}")
                        loss_sum.zero_(), norm_sum.zero_()
                        count, t_last = 0, time.perf_counter()
                        if accelerator.num_processes > 1:
                            stop_now = stop_any > 0
                t_pause = time.perf_counter()  # sampling and checkpointing do not count towards img/s
                if main and sample_due:
                    snapshot_samples(step)
                if eval_due:
                    results = evaluator(ema_weights(), sampler, cfg.sampler.steps)  # every process takes part
                    if main:
                        run.append_metrics({"step": step, "train/step": step, **results})
                        tracker.log(results, step)
                if checkpoint_due or stop_now:
                    save_checkpoint(accelerator, run, step, tcfg.keep_checkpoints)
                t_last += time.perf_counter() - t_pause
                if stop_now:
                    break

        # ------------------------------------------------------------ done
        if stop_now and step < tcfg.max_steps:
            status = "interrupted"
            if main:
                log.warning("interrupted at step %d; checkpoint saved. Continue with: python -m diffexp.train resume=%s",
                            step, run.path)
        else:
            if main:
                ema.catch_up(unwrapped.parameters(), step)  # for a resume with nothing left to train
                export_pipeline(ema_weights(), noise_scheduler, run)
                log.info("finished %d steps; pipeline in %s", step, run.model_dir)
            status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        stop.restore()
        if main:
            run.finish(status)
            if tracker is not None:
                tracker.finish(status)
        accelerator.end_training()
    return status
