"""The training loop: set up, then one flat loop of a short step, with maintenance (log, sample,
evaluate, checkpoint, stop) only on the steps where one of them is due.

One optimizer step = ``trainer.grad_accum`` micro-batches on every process; the global batch is
``trainer.batch_size``. Everything a resumed run needs (model, optimizer, LR schedule, EMA, step,
the log interval's running sums, every RNG) is in the accelerate checkpoint, and the data order
depends only on (seed, step), so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import copy
import json
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

from diffexp import DiffexpError, latents
from diffexp import pipeline as pipeline_module
from diffexp import schedulers as schedulers_module
from diffexp.build import (build_lr_scheduler, build_model, build_objective, build_optimizer, build_sampler,
                           fused_adamw, is_transformer, resolve_sampler)
from diffexp.data import Batches, center_window, load_data
from diffexp.evaluation import auto_eval_every, count_flops, make_evaluator, training_rng_untouched
from diffexp.perf import configure_backends, dynamo_plugin, optimize_model
from diffexp.pipeline import DiffexpPipeline, call_denoiser
from diffexp.records import RunDir, atomic_path, effective_config, replace_path
from diffexp.sampling import generate, save_grid
from diffexp.tracking import check_logger_cfg, make_tracker

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
        self.model.load_state_dict(state["weights"])
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
        log.warning("%s received: stopping at the end of this step", signal.Signals(signum).name)

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
    """Full training state, written to a temporary folder and renamed into place (atomic)."""
    final = run.checkpoint_dir(step)
    tmp = final.with_name(f".tmp_{final.name}")  # one name for every process: each writes its RNG state there
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
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


def evaluation_interval(cfg: DictConfig, t: DictConfig, evaluator, net: torch.nn.Module, sampler,
                        data: "TrainingData") -> int:
    """``trainer.eval_every``, with ``auto`` turned into the interval at which evaluations cost
    ``metric.budget`` of the training's floating-point operations (counted on one image: the
    denoiser's forward and backward, and per evaluation ``metric.num_samples`` x the sampler's
    network evaluations (twice with guidance), the decoder of latents and the feature network).
    ``t``: the trainer settings in force."""
    if t.eval_every != "auto":
        return int(t.eval_every)
    device = next(net.parameters()).device
    x = torch.zeros(1, data.channels, data.size, data.size, device=device)
    step_t = torch.tensor([1], device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device) if data.num_classes else None
    with training_rng_untouched():  # counting (dropout) must not draw from the training's random streams
        train_flops = count_flops(lambda: call_denoiser(net, x, step_t, labels).sum().backward()) * t.batch_size
        net.zero_grad(set_to_none=True)
        with torch.no_grad():
            forward = count_flops(lambda: call_denoiser(net, x, step_t, labels)) * (2 if data.num_classes else 1)
            decode = count_flops(lambda: data.vae.decode(x)) if data.vae is not None else 0
            features = count_flops(lambda: evaluator.net(data.real[:1].to(device)))
    sampler.set_timesteps(resolve_sampler(cfg.sampler, cfg.scheduler).steps)
    nfe = len(sampler.timesteps)
    eval_flops = evaluator.num_samples * (nfe * forward + decode + features)
    every = auto_eval_every(max_steps=t.max_steps, budget=float(cfg.metric.budget), train_flops_per_step=train_flops,
                            eval_flops=eval_flops, multiple_of=t.log_every or 1)
    evaluations = t.max_steps // every + (t.max_steps % every != 0)
    (log.info if evaluator.accelerator.is_main_process else log.debug)("evaluating every %d steps (trainer.eval_every=auto): %d evaluations of %d samples x %d network "
             "evaluations = %.1f%% of the training's compute (metric.budget=%g)", every, evaluations,
             evaluator.num_samples, nfe, 100 * evaluations * eval_flops / (t.max_steps * train_flops), cfg.metric.budget)
    return every


@dataclass
class TrainingData:
    """What the loop trains on: the batches (of images or latents), the real images evaluation
    compares with, the shape the denoiser sees, the classes (None: unconditional) and the autoencoder
    (None: pixel space)."""

    batches: Batches
    real: torch.Tensor
    channels: int
    size: int
    num_classes: int | None
    class_names: list[str] | None
    vae: torch.nn.Module | None


def prepare_data(cfg: DictConfig, t: DictConfig, accelerator: Accelerator) -> TrainingData:
    """The dataset (with labels for ``conditioning=class``), encoded to latents with ``autoencoder``,
    as deterministic batches; the main process fills the caches first."""
    conditional = (cfg.get("conditioning") or {}).get("kind", "none") == "class"
    resolution = int(cfg.dataset.resolution)
    ae_cfg = cfg.get("autoencoder")
    latents.check_config(ae_cfg)
    common = dict(batch_size=t.batch_size, grad_accum=t.grad_accum, num_processes=accelerator.num_processes,
                  process_index=accelerator.process_index, seed=cfg.seed, random_flip=cfg.dataset.random_flip,
                  device=accelerator.device)
    vae = encoded = None
    if latents.wanted(ae_cfg):  # an autoencoder that does not fit is refused before the data is read
        vae = latents.load_autoencoder(ae_cfg, cfg.dataset, accelerator.device)
    with accelerator.main_process_first():
        data = load_data(cfg.dataset, cfg.cache_dir, crop_margin=True, labels=conditional)
        real = center_window(data.images, resolution)  # what the model learns, whatever the crop margin
        if vae is not None:
            encoded = latents.encoded_dataset(vae, real, ae_cfg, cfg.dataset, cfg.cache_dir,
                                              progress=accelerator.is_main_process)
    if vae is None:
        batches = Batches(data.images, crop_to=resolution, labels=data.labels, **common)
        channels, size = int(cfg.dataset.channels), resolution
    else:
        scale = latents.scaling_factor(ae_cfg, vae, encoded["mean"])
        vae.register_to_config(scaling_factor=scale)  # what decoding divides by, and what the export records
        batches = latents.LatentBatches(encoded["mean"], encoded["std"], scale, labels=data.labels, **common)
        channels, size = int(encoded["mean"].shape[1]), int(encoded["mean"].shape[-1])
    num_classes = len(data.class_names) if conditional else None
    return TrainingData(batches, real.contiguous(), channels, size, num_classes, data.class_names, vae)


def grid_labels(grid_size: int, num_classes: int | None) -> tuple[torch.Tensor | None, int | None]:
    """The class of each image of a sample grid (one row per class, ``grid_size // num_classes`` a row)
    and the images per row; (None, None) for an unconditional run (a near-square grid)."""
    if not num_classes:
        return None, None
    per_class = max(1, grid_size // num_classes)
    return torch.arange(num_classes).repeat_interleave(per_class), per_class


# Samplers whose initial noise is unscaled and whose network input is the sample itself: the
# loop of diffusers' DDPMPipeline runs them as they are.
DDPM_PIPELINE_SAMPLERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                          "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                          "PNDMScheduler")


def export_pipeline(denoiser: torch.nn.Module, sampler, run: RunDir, vae=None,
                    class_names: list[str] | None = None) -> None:
    """``model/``: a diffusers pipeline of the EMA weights, the run's sampler and, for latent
    diffusion, the autoencoder (written atomically).

    An unconditional pixel-space model with a sampler that diffusers' ``DDPMPipeline`` runs as it
    is, is a plain ``DDPMPipeline`` folder. Any other is a ``DiffexpPipeline`` (class names in its
    config), whose code is copied beside the weights as ``pipeline.py``, so plain diffusers loads it
    with ``DiffusionPipeline.from_pretrained(model_dir, trust_remote_code=True)``. (diffusers'
    ``DiTPipeline`` is not used for class-conditional DiTs: it hard-codes ImageNet's null class,
    label 1000.) Either gives the images of ``diffexp.sample`` for the same seed.
    """
    num_classes = len(class_names) if class_names else None
    pipe = DiffexpPipeline(unet=denoiser, scheduler=sampler, vae=vae, num_classes=num_classes, class_names=class_names)
    plain_loop = type(sampler).__name__ in DDPM_PIPELINE_SAMPLERS
    with atomic_path(run.model_dir) as tmp:
        pipe.save_pretrained(tmp)
        index_file = tmp / "model_index.json"
        index = json.loads(index_file.read_text())
        if plain_loop and vae is None and num_classes is None and not is_transformer(denoiser):
            index = {k: v for k, v in index.items() if k not in ("vae", "num_classes", "class_names")}
            index["_class_name"] = "DDPMPipeline"
        else:
            shutil.copyfile(Path(pipeline_module.__file__), tmp / "pipeline.py")
            index["_class_name"] = ["pipeline", "DiffexpPipeline"]
        if type(sampler).__module__ == schedulers_module.__name__:  # a scheduler of diffexp's own
            shutil.copyfile(Path(schedulers_module.__file__), tmp / "scheduler" / "schedulers.py")
            index["scheduler"] = ["schedulers", type(sampler).__name__]
        index_file.write_text(json.dumps(index, indent=2) + "\n")


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


def train(cfg: DictConfig, run_dir: str | None, resume: bool = False, session_dir: str | None = None) -> str:
    """Train as ``cfg`` says, writing the run directory; returns the final status.

    ``run_dir`` is only read on the main process (the others get it broadcast). The ``changes``
    a resume recorded in the config apply at their steps (``records.effective_config``).
    ``session_dir`` is Hydra's scratch record of this command, adopted when the run starts. Raises
    DiffexpError for bad input and on non-finite losses or weights (the last checkpoint, which was
    checked to be finite when it was written, is kept).
    """
    t = cfg.trainer
    # ---------------------------------------------------------------- setup
    try:
        accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                                  dynamo_plugin=dynamo_plugin(t))
    except ValueError as e:
        raise DiffexpError(f"trainer.mixed_precision={t.mixed_precision}: {e}") from e
    main = accelerator.is_main_process
    run = RunDir(broadcast_object_list([run_dir])[0])
    device = accelerator.device
    configure_backends(t, device)
    set_seed(cfg.seed, device_specific=True)
    checkpoint = run.latest_checkpoint() if resume else None
    if resume and checkpoint is None:
        raise DiffexpError(f"resume={run.path}: no checkpoint in {run.checkpoints_dir}")
    start = int(checkpoint.name.split("_")[1]) if checkpoint is not None else 0
    t = effective_config(cfg, start).trainer  # the settings in force from here
    change_steps = {c["step"] for c in cfg.get("changes") or [] if c["step"] > start}
    check_logger_cfg(cfg.logger)  # a bad logger setting fails before anything is recorded
    if not (t.eval_every == "auto" or (isinstance(t.eval_every, int) and t.eval_every >= 0)):
        raise DiffexpError(f"trainer.eval_every={t.eval_every}: expected auto or a number of steps (0 = never)")
    ema_every = t.ema.get("update_every", 1)  # configs saved before the option existed: every step
    if not isinstance(ema_every, int) or isinstance(ema_every, bool) or ema_every < 1:
        raise DiffexpError(f"trainer.ema.update_every={ema_every}: expected a positive integer")

    objective = build_objective(cfg)
    sampler_cfg = resolve_sampler(cfg.sampler, cfg.scheduler)
    data = prepare_data(cfg, t, accelerator)
    sampler = build_sampler(sampler_cfg, cfg.scheduler, latent=data.vae is not None)
    model = optimize_model(build_model(cfg.model, channels=data.channels, size=data.size, num_classes=data.num_classes), t)
    batches, vae, conditional = data.batches, data.vae, data.num_classes is not None
    guidance = float(cfg.conditioning.get("guidance_scale", 1.0)) if conditional else 1.0
    optimizer = build_optimizer(t, model.parameters(), device)
    lr_scheduler = build_lr_scheduler(t, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    if t.get("compile", False) and not is_compiled_module(model):  # accelerate keeps a process's first settings
        raise DiffexpError("trainer.compile=true: accelerate did not compile the model (an Accelerator with other "
                           "settings already exists in this process)")
    net = accelerator.unwrap_model(model)
    ema = EMA(net, t.ema)
    state = TrainState(device)
    accelerator.register_for_checkpointing(lr_scheduler, ema, state)
    evaluator = make_evaluator(cfg, accelerator, data.real)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        log.info("resumed from %s (step %d)", checkpoint, state.step)
        for key, (old, new) in apply_settings(t, optimizer, lr_scheduler, ema).items():
            log.info("resume: trainer.%s %s -> %s (from the config; moments and schedule position from the checkpoint)",
                     key, old, new)
    n_params = sum(p.numel() for p in net.parameters())
    eval_every = evaluation_interval(cfg, t, evaluator, net, sampler, data) if evaluator is not None else 0

    # ---------------------------------------------------------------- train
    status, tracker, stop = "failed", None, StopRequest()
    max_norm = t.max_grad_norm or math.inf
    step, stopping, t_last, timed = state.step, False, time.perf_counter(), 0
    t_start, eval_seconds = time.perf_counter(), 0.0
    try:
        if main:
            run.path.mkdir(parents=True, exist_ok=True)
            if session_dir:
                run.adopt_session(Path(session_dir), resumed=resume)
            run.write_config(cfg)
            run.start(cfg, num_processes=accelerator.num_processes, resumed=resume,
                      extra={"num_parameters": n_params, "device": str(device),
                             "mixed_precision": accelerator.mixed_precision, "fused_adamw": fused_adamw(t, device),
                             "eval_every": eval_every, "class_names": data.class_names})
            if resume:
                run.truncate_metrics(state.step)
            tracker = make_tracker(cfg.logger, cfg, accelerator, run, run.info().get("wandb_run_id"))
            if tracker.run_id:
                run.update_info(wandb_run_id=tracker.run_id)
            log.info("run %s: %s, %.2fM parameters, %d process(es) on %s, batch %d (%d per micro-batch)",
                     run.path, cfg.name, n_params / 1e6, accelerator.num_processes, device, t.batch_size,
                     batches.per_micro)
        with logging_redirect_tqdm(), tqdm(total=t.max_steps, initial=state.step, unit="step", disable=not main,
                                           dynamic_ncols=True, desc=cfg.name) as bar:
            while step < t.max_steps:
                step += 1
                model.train()
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
                loss, grad_norm = train_step(model, objective, batches, step, optimizer, accelerator, max_norm,
                                             t.grad_accum, data.num_classes, float(cfg.conditioning.get("p_uncond", 0)))
                lr_scheduler.step()
                state.add(loss, grad_norm)
                with phase("ema"):
                    if step % ema_every == 0:
                        ema.update(net, step)
                state.step, timed = step, timed + 1
                bar.update(1)

                log_now = due(step, t.log_every, t.max_steps)
                sample_now = due(step, t.sample_every, t.max_steps)
                eval_now = eval_every > 0 and due(step, eval_every, t.max_steps)
                stopping = bool(stop.signum) and accelerator.num_processes == 1  # several: agreed at log steps
                checkpoint_now = due(step, t.checkpoint_every, t.max_steps) or stopping
                change_now = step in change_steps
                if not (log_now or sample_now or eval_now or checkpoint_now or change_now):
                    continue
                # ---------------------------------------- maintenance: only when something is due
                with phase("logging"):
                    if log_now:
                        # The one host-device sync of the loop. The stop request rides along, so processes
                        # agree on it where they sync anyway.
                        flag = torch.tensor([float(stop.signum)], device=device)
                        loss_mean, norm_mean, bad, stop_any = accelerator.reduce(
                            torch.cat([state.sums[:2] / state.count, state.sums[2:], flag]), "mean").tolist()
                        if bad or not math.isfinite(loss_mean):
                            raise DiffexpError(f"non-finite loss at or before step {step}: stopped; "
                                               f"last good checkpoint {run.latest_checkpoint() or '(none)'} kept")
                        row = {"step": step, "train/loss": loss_mean, "train/lr": lr, "train/grad_norm": norm_mean,
                               "train/img_per_s": timed * t.batch_size / (time.perf_counter() - t_last),
                               "train/step": step, "train/epoch": step / batches.steps_per_epoch}
                        if main:
                            run.append_metrics(row)
                            tracker.log(row, step)
                            bar.set_postfix(loss=f"{loss_mean:.4f}", img_s=f"{row['train/img_per_s']:.0f}")
                        state.reset()
                        timed, t_last = 0, time.perf_counter()
                        if accelerator.num_processes > 1 and stop_any > 0:
                            stopping = checkpoint_now = True
                t_pause = time.perf_counter()  # sampling, evaluation and checkpoints do not count towards img/s
                if sample_now or eval_now:
                    ema.update(net, step)  # every process, so the averages stay one
                if sample_now and main:
                    labels, per_row = grid_labels(t.grid_size, data.num_classes)
                    grid_images = generate(ema.model, sampler, n=len(labels) if conditional else t.grid_size,
                                           steps=sampler_cfg.steps, seed=cfg.seed, vae=vae, num_classes=data.num_classes,
                                           labels=labels, guidance_scale=guidance)
                    image = save_grid(grid_images, run.sample_grid_file(step), nrow=per_row)
                    tracker.log_image("samples/grid", image, step)
                if eval_now:
                    results = evaluator(ema.model, sampler, sampler_cfg.steps, vae=vae, num_classes=data.num_classes,
                                        guidance_scale=guidance)  # every process takes part
                    eval_seconds += results["eval/seconds"]
                    if main:
                        run.append_metrics({"step": step, "train/step": step, **results})
                        tracker.log(results, step)
                if checkpoint_now:
                    # A kept checkpoint is one whose losses and weights were checked to be finite.
                    if not all_finite(accelerator, state, net, ema.model):
                        raise DiffexpError(f"non-finite loss or weights at or before step {step}: stopped; "
                                           f"last good checkpoint {run.latest_checkpoint() or '(none)'} kept")
                    save_checkpoint(accelerator, run, step, t.keep_checkpoints)
                if change_now:  # settings a resume changed at this step (replayed by reproduce)
                    t = effective_config(cfg, step).trainer
                    for key, (old, new) in apply_settings(t, optimizer, lr_scheduler, ema).items():
                        log.info("step %d: trainer.%s %s -> %s (recorded change)", step, key, old, new)
                    max_norm, ema_every, bar.total = t.max_grad_norm or math.inf, t.ema.get("update_every", 1), t.max_steps
                    if evaluator is not None:
                        eval_every = evaluation_interval(cfg, t, evaluator, net, sampler, data)
                t_last += time.perf_counter() - t_pause
                if stopping:
                    break

        # ------------------------------------------------------------ done
        if stopping and step < t.max_steps:
            status = "interrupted"
            if main:
                log.warning("interrupted at step %d; checkpoint saved. Continue with: python -m diffexp.train resume=%s",
                            step, run.path)
        else:
            ema.update(net, step)
            if main:
                export_pipeline(ema.model, sampler, run, vae=vae, class_names=data.class_names)
                log.info("finished %d steps; pipeline in %s", step, run.model_dir)
            status = "finished"
        if main and eval_seconds:
            wall = time.perf_counter() - t_start
            run.update_info(eval_seconds=round(eval_seconds, 3), loop_seconds=round(wall, 3))
            log.info("evaluation took %.1fs of this session's %.1fs (%.1f%%)", eval_seconds, wall, 100 * eval_seconds / wall)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        stop.restore()
        if main and run.info_file.exists() and run.info().get("status") == "running":
            run.finish(status)
        if tracker is not None:
            tracker.finish(status)
        accelerator.end_training()
    return status
