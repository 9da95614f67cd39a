"""The training loop: set up, then one flat loop of a short step, with maintenance (log, sample,
evaluate, checkpoint, stop) only on the steps where one of them is due.

One optimizer step = ``trainer.grad_accum`` micro-batches on every process; the global batch is
``trainer.batch_size``. Everything a resumed run needs (model, optimizer, LR schedule, EMA, step,
the log interval's running sums, every RNG) is in the accelerate checkpoint, and the data and
noise of every sample depend only on (seed, step, its place in the global batch), so a resumed run
continues exactly where the interrupted one stopped, on any number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, fields
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
from diffexp.objectives import Noised
from diffexp.quality.evaluator import evaluation_interval, make_evaluator
from diffexp.records.rundir import RunDir
from diffexp.records.tracking import check_logger_cfg, make_tracker
from diffexp.sampling.export import export_pipeline
from diffexp.sampling.generate import check_steps, generate, save_grid
from diffexp.sampling.pipeline import call_denoiser
from diffexp.training.checkpoints import all_finite, continue_schedule, load_parent, save_checkpoint
from diffexp.training.launch import check_launch
from diffexp.training.perf import configure_backends, dynamo_plugin, optimize_model
from diffexp.training.phema import PowerEMA, drop_snapshots_after, make_averages, snapshot_dtype
from diffexp.training.state import EMA, TrainState
from diffexp.training.stop import StopRequest

log = logging.getLogger(__name__)


class Speed:
    """Training images per second between two log steps; the time spent sampling, evaluating and
    checkpointing (``paused``) is left out."""

    def __init__(self, batch_size: int):
        self.batch_size, self.steps, self.since = batch_size, 0, time.perf_counter()

    def read(self) -> float:
        """Images per second since the last read (and start counting again)."""
        now = time.perf_counter()
        rate = self.steps * self.batch_size / (now - self.since)
        self.steps, self.since = 0, now
        return rate

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.since += time.perf_counter() - start


def every(step: int, interval: int, last: int) -> bool:
    """True at every ``interval``-th step (0 = never) and at the last step."""
    return step == last or (interval > 0 and step % interval == 0)


@dataclass
class Parts:
    """Everything a run trains with, built by ``setup`` (nothing is written before it returns)."""

    cfg: DictConfig
    t: DictConfig  # cfg.trainer
    accelerator: Accelerator
    run: RunDir
    objective: object
    sampler_cfg: DictConfig
    sampler: object
    data: TrainingData
    model: torch.nn.Module  # as accelerate prepared it (DDP, compiled); ``net`` is the plain module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMA | PowerEMA  # the average the run samples, evaluates and exports (trainer.ema.kind)
    state: TrainState
    evaluator: object
    eval_every: int
    p_uncond: float  # class-conditional runs: how often a label is dropped for guidance
    eval_seconds: float = 0.0
    phema: PowerEMA | None = None  # the power-function profiles (``ema`` itself with kind=phema), or None

    @property
    def averages(self) -> list:
        """Every average the run keeps (one object once)."""
        return [self.ema] + ([self.phema] if self.phema is not None and self.phema is not self.ema else [])

    @property
    def guidance(self) -> float:
        """The classifier-free guidance scale of grids and evaluation (1 when unconditional)."""
        return float((self.cfg.get("conditioning") or {}).get("guidance_scale", 1.0)) if self.data.num_classes else 1.0


def train_step(p: Parts, step: int) -> None:
    """Optimizer step ``step``: the step's global batch noised (``noised_step``); for this process's
    micro-batches of it, predict, weighted MSE, backward; then
    clip, step the optimizer and the LR schedule, add the loss and gradient norm to the log
    interval's sums (on the device: no host sync) and, every ``ema.update_every`` steps, the EMA.
    Class-conditional runs: the batch's labels condition the network, each replaced by the null
    class with probability ``p_uncond`` (classifier-free guidance)."""
    t, acc = p.t, p.accelerator
    p.model.train()
    loss_sum = torch.zeros((), device=acc.device)
    with phase("data"):  # phases are named for `python -m diffexp.bench` (free when no profiler runs)
        whole, whole_labels = noised_step(p, step)
    for micro in range(t.grad_accum):
        with phase("data"):
            rows = p.data.batches.rows(micro)  # this process's share of the step's batch
            batch = Noised(*(None if v is None else v[rows] for v in (getattr(whole, f.name) for f in fields(whole))))
            labels = None if whole_labels is None else whole_labels[rows]
        with acc.accumulate(p.model):
            with phase("forward_backward"):
                pred = call_denoiser(p.model, batch.model_input, batch.timestep, labels)
                per_sample = F.mse_loss(pred.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
                loss = (per_sample * batch.weight).mean() if batch.weight is not None else per_sample.mean()
                acc.backward(loss)
            with phase("optimizer"):
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(p.model.parameters(), t.max_grad_norm or math.inf).detach()
                p.optimizer.step()
                p.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach() / t.grad_accum
    p.lr_scheduler.step()
    p.state.add(loss_sum, grad_norm)
    with phase("ema"):
        if step % t.ema.get("update_every", 1) == 0:
            for average in p.averages:
                average.update(p.net, step)
    p.state.step = step


def noised_step(p: Parts, step: int) -> tuple[Noised, torch.Tensor | None]:
    """Optimizer step ``step``'s whole global batch, noised, and its labels (each replaced by the null
    class with probability ``p_uncond``; None when unconditional), drawn from an RNG seeded by
    (seed, step) alone: every process draws the same numbers and trains on its rows, so the noise of
    each sample, and the run, do not depend on the number of processes or on ``trainer.grad_accum``."""
    acc, batches, null_class = p.accelerator, p.data.batches, p.data.num_classes
    devices = [acc.device.index or 0] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=acc.device.type if devices else "cuda"):
        torch.manual_seed(p.cfg.seed * 1_000_000_007 + step)
        whole = p.objective.noise(batches.get_step(step - 1))
        labels = None
        if null_class is not None:
            labels = batches.labels[batches.step_indices(step - 1)]
            labels = torch.where(torch.rand(labels.shape, device=labels.device) < p.p_uncond, null_class, labels)
    return whole, labels


def due_now(p: Parts, step: int, stop_signal: int) -> set[str]:
    """The maintenance due after optimizer step ``step``, by name: ``log``, ``sample``, ``eval``,
    ``checkpoint``, ``snapshot`` (of the power-function EMA profiles; also when stopping), and ``stop``
    (with a checkpoint) at ``trainer.stop_at`` or when a signal asked any process to stop
    (``stop_signal``, which every process agrees on after every step)."""
    t, last = p.t, p.t.max_steps
    due = {name for name, interval in (("log", t.log_every), ("sample", t.sample_every),
                                       ("eval", p.eval_every), ("checkpoint", t.checkpoint_every))
           if every(step, interval, last)}
    if not p.eval_every:
        due.discard("eval")
    if step == t.get("stop_at") or stop_signal:
        due |= {"stop", "checkpoint"}
    if p.phema is not None and every(step, t.ema.phema.snapshot_every, last):
        due.add("snapshot")
    return due


def setup(cfg: DictConfig, run_dir: str | None, resume: bool) -> Parts:
    """Build the accelerator, data, model, optimizer, schedule, EMA, sampler and evaluator, and load
    the newest checkpoint when resuming (or the parent's for ``init_from``). Bad input raises here,
    before anything is written."""
    t = cfg.trainer
    try:
        accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                                  dynamo_plugin=dynamo_plugin(t))
    except ValueError as e:
        raise DiffexpError(f"trainer.mixed_precision={t.mixed_precision}: {e}") from e
    check_launch()  # (python -m diffexp.train checked before its heavy imports; bench and reproduce come here)
    run = RunDir(broadcast_object_list([run_dir])[0])
    configure_backends(t, accelerator.device)
    set_seed(cfg.seed, device_specific=True)
    checkpoint = run.latest_checkpoint() if resume else None
    if resume and checkpoint is None:
        raise DiffexpError(f"resume={run.path}: no checkpoint in {run.checkpoints_dir}")
    check_logger_cfg(cfg.logger)  # a bad logger setting fails before anything is recorded

    objective = build_objective(cfg.scheduler, t)
    sampler_cfg = resolve_sampler(cfg.sampler, cfg.scheduler)
    data = prepare_data(cfg, t, accelerator)
    sampler = build_sampler(sampler_cfg, cfg.scheduler, latent=data.vae is not None)
    check_steps(sampler, int(sampler_cfg.steps))
    model = optimize_model(build_model(cfg.model, channels=data.channels, size=data.size, num_classes=data.num_classes), t)
    optimizer = build_optimizer(t, model.parameters(), accelerator.device)
    lr_scheduler = build_lr_scheduler(t, optimizer)  # over this command's max_steps (a resume may extend it)
    model, optimizer = accelerator.prepare(model, optimizer)
    if t.get("compile", False) and not is_compiled_module(model):  # accelerate keeps a process's first settings
        raise DiffexpError("trainer.compile=true: accelerate did not compile the model (an Accelerator with other "
                           "settings already exists in this process)")
    net = accelerator.unwrap_model(model, keep_torch_compile=False)  # the plain module: EMA copy, export
    (ema, phema), state = make_averages(net, t.ema), TrainState(accelerator.device)
    # custom_checkpoint_0, 1 (EMA_FILE), 2, and with kind=ema+phema 3 (PHEMA_FILE)
    accelerator.register_for_checkpointing(lr_scheduler, ema, state, *([phema] if phema not in (None, ema) else []))
    evaluator = make_evaluator(cfg, accelerator, data.real, evaluates=bool(t.eval_every))
    p_uncond = float((cfg.get("conditioning") or {}).get("p_uncond", 0.0))  # runs before conditioning: none
    p = Parts(cfg, t, accelerator, run, objective, sampler_cfg, sampler, data, model, net, optimizer,
              lr_scheduler, ema, state, evaluator, 0, p_uncond, phema=phema)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        continue_schedule(optimizer, lr_scheduler)
        log.info("resumed from %s (step %d)", checkpoint, state.step)
    elif cfg.get("init_from"):
        load_parent(cfg, p.net, p.ema, p.optimizer, accelerator.device, phema)
    p.eval_every = evaluation_interval(cfg, t, evaluator, net, sampler, data, objective) if evaluator is not None else 0
    return p


def parent_record(cfg: DictConfig) -> dict | None:
    """run.json's ``parent`` of a run made with ``init_from``: ``{run, step, wandb_run_id}``; else None."""
    if not cfg.get("init_from"):
        return None
    return {"run": str(cfg.init_from), "step": int(cfg.checkpoint),
            "wandb_run_id": RunDir(cfg.init_from).info().get("wandb_run_id")}


def start_records(p: Parts, resume: bool, session_dir: str | None):
    """On the main process: config.yaml, run.json (status running; a resume noted in its ``resumes``
    with the step and an extension of ``max_steps``; a new run's ``parent``), the metrics a resume
    replays dropped, Hydra's record of this command adopted, and the tracker; returns the tracker."""
    run, acc, cfg = p.run, p.accelerator, p.cfg
    n_params = sum(q.numel() for q in p.net.parameters())
    note, parent = None, None if resume else parent_record(cfg)
    if resume:
        note, before = {"step": p.state.step}, run.config().trainer.max_steps  # read before it is rewritten
        if before != p.t.max_steps:
            note["max_steps"] = [before, p.t.max_steps]
    run.path.mkdir(parents=True, exist_ok=True)
    if session_dir:
        run.adopt_session(Path(session_dir), resumed=resume)
    run.write_config(cfg)
    run.start(cfg, num_processes=acc.num_processes, resumed=resume, resume_note=note,
              extra={"num_parameters": n_params, "device": str(acc.device), "mixed_precision": acc.mixed_precision,
                     "fused_adamw": fused_adamw(p.t, acc.device), "eval_every": p.eval_every,
                     "class_names": p.data.class_names, **({"parent": parent} if parent else {})})
    logged = run.last_recorded_step() if resume else 0  # what the tracker already holds of this run
    if resume:
        run.truncate_metrics(p.state.step)
        drop_snapshots_after(run.path / "phema", p.state.step)
    fork = f"{parent['wandb_run_id']}?_step={parent['step']}" if parent and parent["wandb_run_id"] else None
    tracker = make_tracker(cfg.logger, cfg, acc, run, run.info().get("wandb_run_id"), fork_from=fork,
                           logged_through=logged)
    if tracker.run_id:
        run.update_info(wandb_run_id=tracker.run_id)
    log.info("run %s: %s, %.2fM parameters, %d process(es) on %s, batch %d (%d per micro-batch)", run.path, cfg.name,
             n_params / 1e6, acc.num_processes, acc.device, p.t.batch_size, p.data.batches.per_micro)
    return tracker


@contextlib.contextmanager
def progress_bar(p: Parts, step: int):
    """A tqdm bar of the optimizer steps on the main process (log lines printed above it)."""
    with logging_redirect_tqdm(), tqdm(total=p.t.max_steps, initial=step, unit="step", dynamic_ncols=True,
                                       disable=not p.accelerator.is_main_process, desc=p.cfg.name) as bar:
        yield bar


def log_row(p: Parts, step: int, lr: float, speed: Speed) -> dict:
    """The row of log step ``step`` (the interval's mean loss and gradient norm over every process,
    the learning rate it used, img/s): the loop's one host-device sync. A non-finite loss stops the
    run here."""
    state = p.state
    with phase("logging"):
        loss, norm, bad = p.accelerator.reduce(torch.cat([state.sums[:2] / state.count, state.sums[2:]]), "mean").tolist()
    if bad or not math.isfinite(loss):
        raise DiffexpError(f"non-finite loss at or before step {step}: stopped; "
                           f"last good checkpoint {p.run.latest_checkpoint() or '(none)'} kept")
    state.reset()
    return {"step": step, "train/loss": loss, "train/lr": lr, "train/grad_norm": norm,
            "train/img_per_s": speed.read(), "train/step": step,
            "train/epoch": step / p.data.batches.steps_per_epoch}


def sample_grid(p: Parts, step: int):
    """The fixed-noise grid of the EMA weights (one row per class when conditional), saved; returns the image."""
    labels, per_row = grid_labels(p.t.grid_size, p.data.num_classes)
    images = generate(p.ema.model, p.sampler, n=len(labels) if labels is not None else p.t.grid_size,
                      steps=p.sampler_cfg.steps, seed=p.cfg.seed, vae=p.data.vae, num_classes=p.data.num_classes,
                      labels=labels, guidance_scale=p.guidance)
    return save_grid(images, p.run.sample_grid_file(step), nrow=per_row)


def evaluate(p: Parts) -> dict:
    """The evaluator's metrics of the EMA weights (every process takes part); its time is added up."""
    results = p.evaluator(p.ema.model, p.sampler, p.sampler_cfg.steps, vae=p.data.vae,
                          num_classes=p.data.num_classes, guidance_scale=p.guidance, objective=p.objective)
    p.eval_seconds += results["eval/seconds"]
    return results


def snapshot(p: Parts, step: int) -> None:
    """The power-function EMA profiles brought up to ``step`` (every process) and written to RUN_DIR/phema/ (main)."""
    p.phema.update(p.net, step)
    if p.accelerator.is_main_process:
        p.phema.save_snapshots(p.run.path / "phema", snapshot_dtype(p.t.ema))


def checkpoint(p: Parts, step: int) -> None:
    """Save the training state, once its losses and weights are checked finite (so a kept checkpoint is good)."""
    models = [m for a in p.averages for m in getattr(a, "models", [a.model])]
    if not all_finite(p.accelerator, p.state, p.net, *models):
        raise DiffexpError(f"non-finite loss or weights at or before step {step}: stopped; "
                           f"last good checkpoint {p.run.latest_checkpoint() or '(none)'} kept")
    # The log interval's sums are saved from the main process: made every process's mean first, so a
    # resume on any number of processes logs the interval's global mean.
    p.state.sums.copy_(p.accelerator.reduce(p.state.sums, "mean"))
    save_checkpoint(p.accelerator, p.run, step, p.t.keep_checkpoints)


def export(p: Parts, step: int) -> None:
    """The EMA brought up to the last step (every process), then the diffusers pipeline written (main)."""
    p.ema.update(p.net, step)
    if p.accelerator.is_main_process:
        export_pipeline(p.ema.model, p.sampler, p.run, vae=p.data.vae, class_names=p.data.class_names)
        log.info("finished %d steps; pipeline in %s", step, p.run.model_dir)


def train(cfg: DictConfig, run_dir: str | None, resume: bool = False, session_dir: str | None = None) -> str:
    """Train as ``cfg`` says, writing the run directory; returns the final status: ``finished``,
    ``interrupted`` (by SIGINT/SIGTERM or at ``trainer.stop_at``, with a checkpoint to resume from) or
    ``requeue`` (interrupted by a requeue signal, SIGUSR1/SIGUSR2, which was then handed on: see
    ``StopRequest.hand_on``; run.json says ``interrupted``).

    ``resume``: continue ``run_dir`` from its newest checkpoint. ``run_dir`` is only read on the main
    process (the others get it broadcast); ``session_dir`` is Hydra's scratch record of this
    command, adopted when the run starts. Raises DiffexpError for bad input, when another command
    is training in ``run_dir``, and on non-finite losses or weights (the last checkpoint, checked
    finite when it was written, is kept).
    """
    p = setup(cfg, run_dir, resume)
    with contextlib.ExitStack() as held:
        hold_run_dir(p, held)
        return train_loop(p, resume, session_dir)


def hold_run_dir(p: Parts, held: contextlib.ExitStack) -> None:
    """The main process takes the run directory's lock for this command (released when ``held``
    closes); every process raises the same one-line DiffexpError when another command holds it."""
    refused = None
    if p.accelerator.is_main_process:
        try:
            held.enter_context(p.run.training_lock())
        except DiffexpError as e:
            refused = str(e)
    refused = broadcast_object_list([refused])[0]
    if refused:
        raise DiffexpError(refused, everywhere=True)


def train_loop(p: Parts, resume: bool, session_dir: str | None) -> str:
    """``train``'s records and loop, once the run directory is this command's."""
    acc, t, main = p.accelerator, p.t, p.accelerator.is_main_process
    status, tracker, speed, t_start = "failed", None, Speed(t.batch_size), time.perf_counter()
    stop = StopRequest(acc.num_processes)
    step, stopping, left_together = p.state.step, False, False
    try:
        tracker = start_records(p, resume, session_dir) if main else None
        with progress_bar(p, step) as bar:
            while step < t.max_steps and not stopping:
                step += 1
                lr = p.optimizer.param_groups[0]["lr"]  # the rate this step uses
                train_step(p, step)
                speed.steps += 1
                bar.update(1)
                due = due_now(p, step, stop.agreed())  # every process, every step: one number on the CPU
                if not due:
                    continue
                # ---------------------------------------- maintenance: only when something is due
                if "log" in due:
                    row = log_row(p, step, lr, speed)
                    if main:
                        p.run.append_metrics(row)
                        tracker.log(row, step)
                        bar.set_postfix(loss=f"{row['train/loss']:.4f}", img_s=f"{row['train/img_per_s']:.0f}")
                with speed.paused():  # sampling, evaluation and checkpoints do not count towards img/s
                    if due & {"sample", "eval"}:
                        p.ema.update(p.net, step)  # on every process, so the averages stay one
                    if "sample" in due and main:
                        tracker.log_image("samples/grid", sample_grid(p, step), step)
                    if "eval" in due:  # every process takes part
                        results = evaluate(p)
                        if main:
                            p.run.append_metrics({"step": step, "train/step": step, **results})
                            tracker.log(results, step)
                    if "snapshot" in due or "stop" in due and p.phema is not None:
                        snapshot(p, step)
                    if "checkpoint" in due:
                        checkpoint(p, step)
                stopping = "stop" in due

        # ------------------------------------------------------------ done
        if stopping and step < t.max_steps:
            status = "requeue" if stop.requeue else "interrupted"
            if main:
                log.warning("interrupted at step %d; checkpoint saved. Continue with: python -m diffexp.train resume=%s "
                            "(or the same command again, where hydra.run.dir is fixed)", step, p.run.path)
        else:
            export(p, step)
            status = "finished"
        if main and p.eval_seconds:
            wall = time.perf_counter() - t_start
            p.run.update_info(eval_seconds=round(p.eval_seconds, 3), loop_seconds=round(wall, 3))
            log.info("evaluation took %.1fs of this session's %.1fs (%.1f%%)", p.eval_seconds, wall,
                     100 * p.eval_seconds / wall)
        left_together = True
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if main and p.run.info_file.exists() and p.run.info().get("status") == "running":
            p.run.finish("interrupted" if status == "requeue" else status,
                         **({"stopped_by": signal_name(stop.signum)} if stop.signum and status != "failed" else {}))
        if tracker is not None:
            tracker.finish("interrupted" if status == "requeue" else status)
        if left_together:
            # Every process leaves after the records are written: a launcher that sees one process end
            # stops the others, which must not be half-way through.
            acc.wait_for_everyone()
        stop.restore()
        acc.end_training()
    if status == "requeue":
        stop.hand_on(main)
    return status


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
