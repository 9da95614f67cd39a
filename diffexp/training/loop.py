"""The training loop: set up, then one flat loop of a short step, with maintenance (log, sample,
evaluate, checkpoint, stop) only on the steps where one of them is due.

One optimizer step = ``trainer.grad_accum`` micro-batches on every process; the global batch is
``trainer.batch_size``. Everything a resumed run needs (model, optimizer, LR schedule, EMA, step,
the log interval's running sums, every RNG) is in the accelerate checkpoint, and the data order
depends only on (seed, step), so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, is_compiled_module, set_seed
from omegaconf import DictConfig
from torch.profiler import record_function as phase
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from diffexp import DiffexpError
from diffexp.data.datasets import Batches
from diffexp.data.training_data import TrainingData, grid_labels, prepare_data
from diffexp.models.build import (
    build_lr_scheduler,
    build_model,
    build_objective,
    build_optimizer,
    build_sampler,
    fused_adamw,
    resolve_sampler,
)
from diffexp.quality.evaluator import evaluation_interval, make_evaluator
from diffexp.records.rundir import RunDir, effective_config, replace_path, write_manifest
from diffexp.records.tracking import check_logger_cfg, make_tracker
from diffexp.sampling.export import export_pipeline
from diffexp.sampling.generate import check_steps, generate, save_grid
from diffexp.sampling.pipeline import call_denoiser
from diffexp.training.perf import configure_backends, dynamo_plugin, optimize_model

log = logging.getLogger(__name__)


class EMA:
    """An exponential moving average of the model's weights: a copy of the model and a lerp.

    The decay of optimizer step ``s`` follows diffusers' ``EMAModel.get_decay`` (warm-up
    ``1 - (1 + s / inv_gamma) ** -power``, capped at ``decay``; 0 until ``update_after_step``).
    ``update(model, step)`` folds every optimizer step since the last update into one lerp, the old
    average weighted by the product of their decays, so updating every N steps keeps the decay
    schedule in optimizer steps (the skipped steps' weights are represented by the newest ones).
    Settings come from the config, not the checkpoint: a resume can change them.
    """

    def __init__(self, model: torch.nn.Module, ema_cfg: DictConfig):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.step = 0  # the optimizer step the average has reached (saved in checkpoints)
        self.cfg = ema_cfg

    def decay_at(self, step: int) -> float:
        """The per-step decay of optimizer step ``step``."""
        c = self.cfg
        n = step - c.update_after_step - 1
        if n <= 0:
            return 0.0
        warm = 1 - (1 + n / c.inv_gamma) ** -c.power if c.use_warmup else (1 + n) / (10 + n)
        return min(warm, c.decay)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Bring the average from its step up to optimizer step ``step`` (nothing to do if it is there)."""
        if step <= self.step:
            return
        kept = math.prod(self.decay_at(s) for s in range(self.step + 1, step + 1))
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - kept)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "shadow_params" in state:  # a diffusers EMAModel, as checkpoints of diffexp 0.1 hold it
            with torch.no_grad():
                for mine, saved in zip(self.model.parameters(), state["shadow_params"]):
                    mine.copy_(saved)
            self.step = int(state["optimization_step"])
            return
        # (runs compiled before the EMA copied the plain module saved its weights under ``_orig_mod.``)
        self.model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["weights"].items()})
        self.step = int(state["step"])


class TrainState:
    """What a checkpoint holds besides model, optimizer, schedule and EMA: the step, and the running
    sums of the log interval in progress (so the first row logged after a resume is the one the
    uninterrupted run logs)."""

    def __init__(self, device: torch.device):
        self.step = 0
        self.sums = torch.zeros(3, device=device)  # loss, gradient norm, non-finite losses
        self.count = 0  # optimizer steps in the sums

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Accumulate one step on the device (no sync)."""
        self.sums += torch.stack([loss, grad_norm, (~torch.isfinite(loss)).float()])
        self.count += 1

    def reset(self) -> None:
        self.sums.zero_()
        self.count = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "sums": self.sums.cpu(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if "sums" in state:  # checkpoints of diffexp 0.1 hold only the step (and always ended a log interval)
            self.sums.copy_(state["sums"])
            self.count = int(state["count"])


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads at a step boundary; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after this step (with several processes: at the next log step, "
                    "which they agree on), with a checkpoint", signal.Signals(signum).name)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def due(step: int, every: int, last: int) -> bool:
    """True at every ``every``-th step (0 = never) and at the last step."""
    return step == last or (every > 0 and step % every == 0)


def train_step(model, objective, batches: Batches, step: int, optimizer, accelerator: Accelerator,
               max_norm: float, grad_accum: int, null_class: int | None = None,
               p_uncond: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: for each micro-batch, noise it, predict, weighted MSE, backward; then clip
    and step. Class-conditional (``null_class`` set): the batch's labels condition the network, each
    replaced by the null class with probability ``p_uncond`` (classifier-free guidance). Returns the
    mean loss and the gradient norm as device tensors (no host sync)."""
    loss_sum = torch.zeros((), device=accelerator.device)
    for micro in range(grad_accum):
        # Phases are named for `python -m diffexp.bench` (free when no profiler runs).
        with phase("data"):
            batch = objective.noise(batches.get(step - 1, micro))
            labels = None
            if null_class is not None:
                labels = batches.get_labels(step - 1, micro)
                labels = torch.where(torch.rand(labels.shape, device=labels.device) < p_uncond, null_class, labels)
        with accelerator.accumulate(model):
            with phase("forward_backward"):
                pred = call_denoiser(model, batch.model_input, batch.timestep, labels)
                per_sample = F.mse_loss(pred.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
                loss = (per_sample * batch.weight).mean() if batch.weight is not None else per_sample.mean()
                accelerator.backward(loss)
            with phase("optimizer"):
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm).detach()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach() / grad_accum
    return loss_sum, grad_norm


def all_finite(accelerator: Accelerator, state: TrainState, *models: torch.nn.Module) -> bool:
    """Whether, on every process, the losses since the last log step and all weights are finite (one sync)."""
    bad = state.sums[2] + sum((~torch.isfinite(p)).any().float() for m in models for p in m.parameters())
    return accelerator.reduce(bad.reshape(1), "sum").item() == 0


def save_checkpoint(accelerator: Accelerator, run: RunDir, step: int, keep: int) -> Path:
    """Full training state, written to a temporary folder, sealed with its manifest and renamed into
    place (atomic)."""
    final = run.checkpoint_dir(step)
    tmp = final.with_name(f".tmp_{final.name}")  # one name for every process: each writes its RNG state there
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp)  # last: sizes and checksums of every file the processes wrote
        replace_path(tmp, final)
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


def apply_settings(t: DictConfig, optimizer, lr_scheduler, ema: EMA) -> dict:
    """Make the optimizer, the learning-rate schedule and the EMA follow trainer settings ``t`` from
    here on (after a resume, or at a recorded change): the schedule takes the new shape at its
    current position, the Adam moments stay. Returns what changed, as ``{key: (old, new)}``."""
    position = lr_scheduler.last_epoch
    lr_scheduler.lr_lambdas = build_lr_scheduler(t, optimizer).lr_lambdas  # the registered object stays
    lr_scheduler.last_epoch = position
    changed = follow_optimizer_config(optimizer, lr_scheduler, t)
    ema.cfg = t.ema
    return changed


@dataclass
class Parts:
    """Everything a run trains with, built by ``setup`` (nothing is written before it returns)."""

    cfg: DictConfig
    t: DictConfig  # the trainer settings in force (a resume's recorded changes apply at their steps)
    accelerator: Accelerator
    run: RunDir
    change_steps: set[int]
    objective: object
    sampler_cfg: DictConfig
    sampler: object
    data: TrainingData
    model: torch.nn.Module  # as accelerate prepared it (DDP, compiled); ``net`` is the plain module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMA
    state: TrainState
    evaluator: object
    eval_every: int

    @property
    def guidance(self) -> float:
        """The classifier-free guidance scale of grids and evaluation (1 when unconditional)."""
        return float((self.cfg.get("conditioning") or {}).get("guidance_scale", 1.0)) if self.data.num_classes else 1.0


def setup(cfg: DictConfig, run_dir: str | None, resume: bool) -> Parts:
    """Build the accelerator, data, model, optimizer, schedule, EMA, sampler and evaluator, and load
    the newest checkpoint when resuming. Bad input raises here, before anything is written."""
    t = cfg.trainer
    try:
        accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                                  dynamo_plugin=dynamo_plugin(t))
    except ValueError as e:
        raise DiffexpError(f"trainer.mixed_precision={t.mixed_precision}: {e}") from e
    run = RunDir(broadcast_object_list([run_dir])[0])
    configure_backends(t, accelerator.device)
    set_seed(cfg.seed, device_specific=True)
    checkpoint = run.latest_checkpoint() if resume else None
    if resume and checkpoint is None:
        raise DiffexpError(f"resume={run.path}: no checkpoint in {run.checkpoints_dir}")
    start = int(checkpoint.name.split("_")[1]) if checkpoint is not None else 0
    t = effective_config(cfg, start).trainer  # the settings in force from here
    check_logger_cfg(cfg.logger)  # a bad logger setting fails before anything is recorded

    objective = build_objective(cfg)
    sampler_cfg = resolve_sampler(cfg.sampler, cfg.scheduler)
    data = prepare_data(cfg, t, accelerator)
    sampler = build_sampler(sampler_cfg, cfg.scheduler, latent=data.vae is not None)
    check_steps(sampler, int(sampler_cfg.steps))
    model = optimize_model(build_model(cfg.model, channels=data.channels, size=data.size, num_classes=data.num_classes), t)
    optimizer = build_optimizer(t, model.parameters(), accelerator.device)
    lr_scheduler = build_lr_scheduler(t, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    if t.get("compile", False) and not is_compiled_module(model):  # accelerate keeps a process's first settings
        raise DiffexpError("trainer.compile=true: accelerate did not compile the model (an Accelerator with other "
                           "settings already exists in this process)")
    net = accelerator.unwrap_model(model, keep_torch_compile=False)  # the plain module: EMA copy, export
    ema, state = EMA(net, t.ema), TrainState(accelerator.device)
    accelerator.register_for_checkpointing(lr_scheduler, ema, state)
    change_steps = {c["step"] for c in cfg.get("changes") or [] if c["step"] > start}
    # Evaluation is built when the settings of any part of this session ask for it (a resume may turn it on).
    evaluates = any(effective_config(cfg, s).trainer.eval_every for s in (start, *change_steps))
    evaluator = make_evaluator(cfg, accelerator, data.real, evaluates=evaluates)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        log.info("resumed from %s (step %d)", checkpoint, state.step)
        for key, (old, new) in apply_settings(t, optimizer, lr_scheduler, ema).items():
            log.info("resume: trainer.%s %s -> %s (from the config; moments and schedule position from the checkpoint)",
                     key, old, new)
    eval_every = evaluation_interval(cfg, t, evaluator, net, sampler, data) if evaluator is not None else 0
    return Parts(cfg, t, accelerator, run, change_steps, objective, sampler_cfg, sampler, data, model, net,
                 optimizer, lr_scheduler, ema, state, evaluator, eval_every)


def start_records(p: Parts, resume: bool, session_dir: str | None):
    """On the main process: config.yaml, run.json (status running), the metrics a resume replays
    dropped, Hydra's record of this command adopted, and the tracker; returns the tracker."""
    run, acc, cfg = p.run, p.accelerator, p.cfg
    n_params = sum(q.numel() for q in p.net.parameters())
    run.path.mkdir(parents=True, exist_ok=True)
    if session_dir:
        run.adopt_session(Path(session_dir), resumed=resume)
    run.write_config(cfg)
    run.start(cfg, num_processes=acc.num_processes, resumed=resume,
              extra={"num_parameters": n_params, "device": str(acc.device), "mixed_precision": acc.mixed_precision,
                     "fused_adamw": fused_adamw(p.t, acc.device), "eval_every": p.eval_every,
                     "class_names": p.data.class_names})
    if resume:
        run.truncate_metrics(p.state.step)
    tracker = make_tracker(cfg.logger, cfg, acc, run, run.info().get("wandb_run_id"))
    if tracker.run_id:
        run.update_info(wandb_run_id=tracker.run_id)
    log.info("run %s: %s, %.2fM parameters, %d process(es) on %s, batch %d (%d per micro-batch)", run.path, cfg.name,
             n_params / 1e6, acc.num_processes, acc.device, p.t.batch_size, p.data.batches.per_micro)
    return tracker


def read_losses(p: Parts, step: int, stop_signal: int) -> tuple[float, float, bool]:
    """The log interval's mean loss and gradient norm over every process, and whether any process
    asked to stop: the loop's one host-device sync. A non-finite loss stops the run here."""
    state = p.state
    flag = torch.tensor([float(stop_signal)], device=p.accelerator.device)
    loss, norm, bad, stop_any = p.accelerator.reduce(
        torch.cat([state.sums[:2] / state.count, state.sums[2:], flag]), "mean").tolist()
    if bad or not math.isfinite(loss):
        raise DiffexpError(f"non-finite loss at or before step {step}: stopped; "
                           f"last good checkpoint {p.run.latest_checkpoint() or '(none)'} kept")
    state.reset()
    return loss, norm, stop_any > 0


def sample_grid(p: Parts, step: int):
    """The fixed-noise grid of the EMA weights (one row per class when conditional), saved; returns the image."""
    labels, per_row = grid_labels(p.t.grid_size, p.data.num_classes)
    images = generate(p.ema.model, p.sampler, n=len(labels) if labels is not None else p.t.grid_size,
                      steps=p.sampler_cfg.steps, seed=p.cfg.seed, vae=p.data.vae, num_classes=p.data.num_classes,
                      labels=labels, guidance_scale=p.guidance)
    return save_grid(images, p.run.sample_grid_file(step), nrow=per_row)


def checkpoint(p: Parts, step: int) -> None:
    """Save the training state, once its losses and weights are checked finite (so a kept checkpoint is good)."""
    if not all_finite(p.accelerator, p.state, p.net, p.ema.model):
        raise DiffexpError(f"non-finite loss or weights at or before step {step}: stopped; "
                           f"last good checkpoint {p.run.latest_checkpoint() or '(none)'} kept")
    save_checkpoint(p.accelerator, p.run, step, p.t.keep_checkpoints)


def apply_changes(p: Parts, step: int) -> None:
    """The settings a resume changed at ``step`` take effect (``reproduce`` replays them here)."""
    p.t = effective_config(p.cfg, step).trainer
    for key, (old, new) in apply_settings(p.t, p.optimizer, p.lr_scheduler, p.ema).items():
        log.info("step %d: trainer.%s %s -> %s (recorded change)", step, key, old, new)
    if p.evaluator is not None:
        p.eval_every = evaluation_interval(p.cfg, p.t, p.evaluator, p.net, p.sampler, p.data)


def train(cfg: DictConfig, run_dir: str | None, resume: bool = False, session_dir: str | None = None) -> str:
    """Train as ``cfg`` says, writing the run directory; returns the final status.

    ``run_dir`` is only read on the main process (the others get it broadcast). The ``changes``
    a resume recorded in the config apply at their steps (``records.effective_config``).
    ``session_dir`` is Hydra's scratch record of this command, adopted when the run starts. Raises
    DiffexpError for bad input and on non-finite losses or weights (the last checkpoint, which was
    checked to be finite when it was written, is kept).
    """
    p = setup(cfg, run_dir, resume)
    acc, state, main = p.accelerator, p.state, p.accelerator.is_main_process
    p_uncond = float((cfg.get("conditioning") or {}).get("p_uncond", 0.0))  # runs before conditioning: none
    status, tracker, stop = "failed", None, StopRequest()
    step, stopping, timed, t_last, t_start, eval_seconds = state.step, False, 0, time.perf_counter(), time.perf_counter(), 0.0
    try:
        tracker = start_records(p, resume, session_dir) if main else None
        with logging_redirect_tqdm(), tqdm(total=p.t.max_steps, initial=step, unit="step", disable=not main,
                                           dynamic_ncols=True, desc=cfg.name) as bar:
            while step < p.t.max_steps:
                step, t = step + 1, p.t
                p.model.train()
                lr = p.optimizer.param_groups[0]["lr"]  # the rate this step uses
                loss, grad_norm = train_step(p.model, p.objective, p.data.batches, step, p.optimizer, acc,
                                             t.max_grad_norm or math.inf, t.grad_accum, p.data.num_classes, p_uncond)
                p.lr_scheduler.step()
                state.add(loss, grad_norm)
                with phase("ema"):
                    if step % t.ema.get("update_every", 1) == 0:
                        p.ema.update(p.net, step)
                state.step, timed = step, timed + 1
                bar.update(1)

                log_now = due(step, t.log_every, t.max_steps)
                sample_now = due(step, t.sample_every, t.max_steps)
                eval_now = p.eval_every > 0 and due(step, p.eval_every, t.max_steps)
                stopping = bool(stop.signum) and acc.num_processes == 1  # several: agreed at log steps
                checkpoint_now = due(step, t.checkpoint_every, t.max_steps) or stopping
                change_now = step in p.change_steps
                if not (log_now or sample_now or eval_now or checkpoint_now or change_now):
                    continue
                # ---------------------------------------- maintenance: only when something is due
                if log_now:
                    with phase("logging"):
                        loss_mean, norm_mean, stop_any = read_losses(p, step, stop.signum)
                    row = {"step": step, "train/loss": loss_mean, "train/lr": lr, "train/grad_norm": norm_mean,
                           "train/img_per_s": timed * t.batch_size / (time.perf_counter() - t_last),
                           "train/step": step, "train/epoch": step / p.data.batches.steps_per_epoch}
                    if main:
                        p.run.append_metrics(row)
                        tracker.log(row, step)
                        bar.set_postfix(loss=f"{loss_mean:.4f}", img_s=f"{row['train/img_per_s']:.0f}")
                    timed, t_last = 0, time.perf_counter()
                    stopping = stopping or (acc.num_processes > 1 and stop_any)
                    checkpoint_now = checkpoint_now or stopping
                t_pause = time.perf_counter()  # sampling, evaluation and checkpoints do not count towards img/s
                if sample_now or eval_now:
                    p.ema.update(p.net, step)  # on every process, so the averages stay one
                if sample_now and main:
                    tracker.log_image("samples/grid", sample_grid(p, step), step)
                if eval_now:  # every process takes part
                    results = p.evaluator(p.ema.model, p.sampler, p.sampler_cfg.steps, vae=p.data.vae,
                                          num_classes=p.data.num_classes, guidance_scale=p.guidance)
                    eval_seconds += results["eval/seconds"]
                    if main:
                        p.run.append_metrics({"step": step, "train/step": step, **results})
                        tracker.log(results, step)
                if checkpoint_now:
                    checkpoint(p, step)
                if change_now:
                    apply_changes(p, step)
                    bar.total = p.t.max_steps
                t_last += time.perf_counter() - t_pause
                if stopping:
                    break

        # ------------------------------------------------------------ done
        if stopping and step < p.t.max_steps:
            status = "interrupted"
            if main:
                log.warning("interrupted at step %d; checkpoint saved. Continue with: python -m diffexp.train resume=%s",
                            step, p.run.path)
        else:
            p.ema.update(p.net, step)
            if main:
                export_pipeline(p.ema.model, p.sampler, p.run, vae=p.data.vae, class_names=p.data.class_names)
                log.info("finished %d steps; pipeline in %s", step, p.run.model_dir)
            status = "finished"
        if main and eval_seconds:
            wall = time.perf_counter() - t_start
            p.run.update_info(eval_seconds=round(eval_seconds, 3), loop_seconds=round(wall, 3))
            log.info("evaluation took %.1fs of this session's %.1fs (%.1f%%)", eval_seconds, wall, 100 * eval_seconds / wall)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        stop.restore()
        if main and p.run.info_file.exists() and p.run.info().get("status") == "running":
            p.run.finish(status)
        if tracker is not None:
            tracker.finish(status)
        acc.end_training()
    return status
