"""Image generation (through ``DiffexpPipeline``) and sample grids.

Images are generated in chunks of at most ``batch_size``; chunk ``c`` starts from its own CPU
generator seeded with ``chunk_seed(seed, c)``. So the same seed gives the same images on every
device and under any number of processes (evaluation hands whole chunks to processes), and a
single chunk is exactly what the exported pipeline gives for
``pipe(batch_size=n, generator=torch.Generator().manual_seed(seed))``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import SchedulerMixin
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from diffexp import DiffexpError, first_line
from diffexp.config import need_guidance, need_interval
from diffexp.sampling.pipeline import DiffexpPipeline

CHUNK_SEED_STRIDE = 1_000_003  # chunk c of seed s uses s + c * stride: chunk 0 is plain `seed`


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` of a generation seeded with ``seed``."""
    return int(seed) + CHUNK_SEED_STRIDE * int(chunk)


def chunk_sizes(n: int, batch_size: int) -> list[int]:
    """How ``n`` images split into generation chunks (all ``batch_size`` but maybe the last)."""
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def make_pipeline(denoiser, scheduler: SchedulerMixin, vae=None, num_classes: int | None = None,
                  guide=None) -> DiffexpPipeline:
    """A pipeline over the given parts (nothing is copied), progress bar off; with a ``guide``
    denoiser it autoguides (``DiffexpPipeline``)."""
    pipe = DiffexpPipeline(unet=denoiser, scheduler=scheduler, vae=vae, guide=guide, num_classes=num_classes)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output (floats in [0, 1], N x H x W x C) as uint8."""
    return np.round(images * 255).astype(np.uint8)


@torch.inference_mode()
def generate_chunk(pipe: DiffexpPipeline, *, count: int, steps: int, seed: int, labels=None,
                   guidance_scale: float = 1.0, guidance_interval=None) -> np.ndarray:
    """``count`` uint8 images (N x H x W x C) from one CPU generator seeded with ``seed``."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    out = pipe(batch_size=count, num_inference_steps=steps, generator=generator, class_labels=labels,
               guidance_scale=guidance_scale, guidance_interval=guidance_interval, output_type="np").images
    return to_uint8(out)


def generate(denoiser, scheduler: SchedulerMixin, *, n: int, steps: int, seed: int, batch_size: int = 250,
             vae=None, num_classes: int | None = None, labels=None, guidance_scale: float = 1.0,
             guide=None, guidance_interval=None, progress: bool = False) -> np.ndarray:
    """``n`` images as uint8 N x H x W x C; the same arguments give the same images.

    ``labels`` (n class ids) for class-conditional denoisers, guided with ``guidance_scale``:
    classifier-free, or by the ``guide`` denoiser (autoguidance) when one is given, within
    ``guidance_interval`` (``pipeline.in_interval``; None: the whole trajectory).
    """
    pipe = make_pipeline(denoiser, scheduler, vae, num_classes, guide)
    was_training = denoiser.training
    denoiser.eval()
    chunks, start = [], 0
    try:
        with tqdm(total=n, desc="sampling", unit="img", disable=not progress, leave=False) as bar:
            for c, count in enumerate(chunk_sizes(n, batch_size)):
                chunk_labels = None if labels is None else labels[start:start + count]
                chunks.append(generate_chunk(pipe, count=count, steps=steps, seed=chunk_seed(seed, c),
                                             labels=chunk_labels, guidance_scale=guidance_scale,
                                             guidance_interval=guidance_interval))
                start += count
                bar.update(count)
    finally:
        denoiser.train(was_training)
    return np.concatenate(chunks)


@dataclass
class Samples:
    """What ``sample_run`` made: uint8 images N x H x W x C, their class labels (None for an
    unconditional run), and how (sampler config name, steps, seed, and the checkpoint step of the
    weights, None for ``model/``)."""

    images: np.ndarray
    labels: np.ndarray | None
    sampler: str
    steps: int
    seed: int
    checkpoint: int | None = None


def class_names(run) -> list[str] | None:
    """The class names of a class-conditional run (index = class id), None for an unconditional one."""
    from diffexp.records.rundir import RunDir

    run = RunDir(run) if not isinstance(run, RunDir) else run
    if (run.config().get("conditioning") or {}).get("kind", "none") != "class":
        return None
    return [str(n) for n in run.info().get("class_names") or []]


def requested_labels(names: list[str] | None, n: int, class_label: int | None) -> np.ndarray | None:
    """The class of each of ``n`` images: ``class_label`` for all, else every class in turn (i mod
    the number of classes); None for an unconditional run. A class id out of range is refused."""
    if names is None:
        return None
    if class_label is None:
        return np.arange(n) % len(names)
    if isinstance(class_label, bool) or not isinstance(class_label, int) or not 0 <= class_label < len(names):
        raise DiffexpError(f"class_label={class_label}: expected a class id from 0 to {len(names) - 1} "
                           f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    return np.full(n, class_label)


def choose_sampler(requested, run_cfg) -> tuple[DictConfig, int]:
    """The sampler config and step count a command samples run config ``run_cfg``'s model with: the
    ``sampler=`` group it was given (a node whose ``scheduler`` names its class), else the run's own
    sampler, with the options of ``+sampler.scheduler.KEY=V`` applied to it; the steps from
    ``requested.steps`` when set, else the chosen sampler's. The one place every command (``sample``,
    ``evaluate``, the app, research) decides this."""
    from diffexp.models.build import resolve_sampler

    options = (requested.get("scheduler") if requested is not None else None) or {}
    own = "_target_" not in options
    chosen = run_cfg.sampler if own else requested
    if own and options:  # the run's own sampler with some options changed (resolve_sampler applies them to auto)
        chosen = OmegaConf.merge(OmegaConf.to_container(chosen), {"scheduler": options})
    sampler_cfg = resolve_sampler(chosen, run_cfg.scheduler)
    steps = requested.get("steps") if requested is not None else None
    return sampler_cfg, int(steps if steps is not None else sampler_cfg.steps)


def choose_guidance(requested: float | None, run_cfg, names: list[str] | None, guide: str | None = None) -> float:
    """The guidance scale to sample with: ``requested``, else the run's own classifier-free one
    (``conditioning.guidance_scale``); 1 (none) for an unconditional run, which refuses a requested
    scale in one line, as it does a scale that is not a finite number >= 0.

    With a guide model (``guide``: how the command names it, ``guide=RUN``) the scale is the
    autoguidance weight w, for unconditional runs too, and must be given: the run's own scale is a
    classifier-free one."""
    if requested is None and guide is not None:
        raise DiffexpError(f"{guide}: give the autoguidance weight too, guidance_scale=w (1: the unguided model; "
                           "Karras et al. 2024 use about 1.5 to 3)")
    if requested is None:
        return float(run_cfg.conditioning.get("guidance_scale", 1.0)) if names else 1.0
    if names is None and guide is None:
        raise DiffexpError(f"guidance_scale={requested}: {run_cfg.get('name') or 'the run'} is an unconditional run "
                           "(no classes to guide towards; guide=RUN or guide_checkpoint=STEP guide it by a weaker "
                           "model)")
    need_guidance(OmegaConf.create({"guidance_scale": requested}))  # the rule the commands' config checks apply
    return float(requested)


def choose_interval(requested, names: list[str] | None, guide: str | None = None) -> tuple[float, float] | None:
    """The ``guidance_interval`` to sample with (``pipeline.in_interval``; None: the whole trajectory):
    ``[lo, hi]`` with 0 <= lo <= hi <= 1, refused in one line otherwise or where nothing is guided
    (an unconditional run without a guide)."""
    if requested is None:
        return None
    need_interval(OmegaConf.create({"guidance_interval": requested}))
    if names is None and guide is None:
        raise DiffexpError(f"guidance_interval={list(requested)}: nothing is guided on an unconditional run "
                           "without a guide (guide=RUN or guide_checkpoint=STEP)")
    lo, hi = requested
    return float(lo), float(hi)


@dataclass
class RunModel:
    """A run's model ready to sample (``load_run_model``): its config, class names (None when
    unconditional), the denoiser and the autoencoder (None in pixel space), on one device; and which
    weights they are: ``checkpoint`` (None: the exported ``model/``, else a checkpoint's step) and the
    training ``step`` they are from."""

    cfg: DictConfig
    names: list[str] | None
    denoiser: torch.nn.Module
    vae: torch.nn.Module | None
    checkpoint: int | None = None
    step: int | None = None


def load_run_model(run, device: str | torch.device, checkpoint: int | str | None = None, *,
                   metric_key: str | None = None, ema_std: float | None = None) -> RunModel:
    """Run directory ``run``'s EMA weights on ``device``, frozen, with the run's config and classes:
    its exported ``model/`` (``checkpoint=None``; a run without one, its newest complete checkpoint), or
    checkpoint ``STEP``, ``last`` or ``best`` (by ``metric_key``), see ``export.model_source``. With
    ``ema_std``, the post-hoc EMA of that relative width at that step instead, reconstructed from the
    run's snapshots (``training.phema.reconstruct``). The one place every command (``sample``,
    ``evaluate``, the app, ``export``) gets a run's model."""
    from diffexp.records.rundir import RunDir
    from diffexp.sampling.export import model_source, run_pipeline

    run = RunDir(run) if not isinstance(run, RunDir) else run
    cfg = run.config()
    source = model_source(run, checkpoint, metric_key)
    pipe = run_pipeline(run, source)
    if ema_std is not None:
        from diffexp.training import phema  # (training imports sampling: not at module level)

        phema.load_weights(pipe.unet, phema.reconstruct(run, float(ema_std), step=source.step))
    vae = pipe.vae.to(device) if pipe.vae is not None else None
    return RunModel(cfg, class_names(run), pipe.unet.to(device).eval().requires_grad_(False), vae,
                    source.checkpoint, source.step)


# What a guide shares with the run it guides: it is evaluated on the run's inputs (shape, noise
# levels as the run's sampler gives them, classes) and its output is combined with the run's, so both
# must mean the same by them.
GUIDE_MUST_MATCH = (("dataset", "dataset.name"), ("resolution", "dataset.resolution"), ("channels", "dataset.channels"),
                    ("conditioning", "conditioning.kind"), ("objective", "scheduler._target_"),
                    ("prediction type", "scheduler.prediction_type"),
                    ("noise schedule", "scheduler.beta_schedule"), ("beta_start", "scheduler.beta_start"),
                    ("beta_end", "scheduler.beta_end"), ("num_train_timesteps", "scheduler.num_train_timesteps"),
                    ("zero-SNR rescaling", "scheduler.rescale_betas_zero_snr"), ("sigma_data", "scheduler.sigma_data"),
                    ("autoencoder", "autoencoder.kind"), ("autoencoder path", "autoencoder.path"),
                    ("autoencoder subfolder", "autoencoder.subfolder"))


def guide_name(guide: str | None, guide_checkpoint) -> str | None:
    """How messages name the requested guide (``guide=RUN``, ``guide_checkpoint=STEP`` or both); None
    without one."""
    parts = [f"guide={guide}"] if guide is not None else []
    parts += [f"guide_checkpoint={guide_checkpoint}"] if guide_checkpoint is not None else []
    return " ".join(parts) or None


def guide_mismatch(run_cfg, names: list[str] | None, guide_cfg, guide_names: list[str] | None) -> str | None:
    """What in a guide run's config (``guide_cfg``, classes ``guide_names``) differs from the guided
    run's in a way autoguidance cannot combine (``GUIDE_MUST_MATCH``, the classes), as one phrase;
    None when the guide is compatible."""
    for what, key in GUIDE_MUST_MATCH:
        mine, its = OmegaConf.select(run_cfg, key, default=None), OmegaConf.select(guide_cfg, key, default=None)
        if mine != its:
            return f"its {what} is {its}, the run's {mine}"
    if names != guide_names:
        return f"its classes are {classes_text(guide_names)}, the run's {classes_text(names)}"
    return None


def classes_text(names: list[str] | None) -> str:
    """A run's classes in short: ``10 classes (0, 1, 2, ...)``, or ``none``."""
    return f"{len(names)} classes ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else "none"


def load_guide(run, names: list[str] | None, guide: str | None, guide_checkpoint,
               device: str | torch.device) -> torch.nn.Module | None:
    """The guide denoiser of autoguidance (Karras et al. 2024) for run ``run``: run ``guide`` (default:
    ``run`` itself) at checkpoint ``guide_checkpoint`` (default: its final model), through
    ``load_run_model``, on ``device``; None when neither is given. A guide that is not a run, or
    samples other data or another way (``guide_mismatch``), is refused in one line."""
    from diffexp.records.rundir import RunDir

    key = guide_name(guide, guide_checkpoint)
    if key is None:
        return None
    run = RunDir(run) if not isinstance(run, RunDir) else run
    guide_run = RunDir(guide) if guide is not None else run
    if not guide_run.exists():
        raise DiffexpError(f"{key}: not a diffexp run directory (no config.yaml)")
    if guide_checkpoint is None and guide_run.path == run.path:
        raise DiffexpError(f"{key}: the run's own final model cannot guide itself (D_guide = D_main); give an "
                           "earlier checkpoint (guide_checkpoint=STEP) or a weaker run")
    try:
        differs = guide_mismatch(run.config(), names, guide_run.config(), class_names(guide_run))
        if differs:
            raise DiffexpError(f"{differs} (a guide must model the same data the same way)")
        model = (load_run_model(guide_run, device) if guide_checkpoint is None
                 else load_run_model(guide_run, device, checkpoint=guide_checkpoint))
    except DiffexpError as e:
        raise DiffexpError(f"{key}: {e}") from None
    return model.denoiser


def sample_run(run, *, n: int, seed: int = 0, sampler_cfg=None, steps: int | None = None, batch_size: int = 250,
               class_label: int | None = None, guidance_scale: float | None = None, guide: str | None = None,
               guide_checkpoint=None, guidance_interval=None, device: str | None = None,
               progress: bool = False, checkpoint: int | str | None = None, metric_key: str | None = None,
               ema_std: float | None = None) -> Samples:
    """``n`` images from run directory ``run``'s EMA weights (its exported ``model/``, or the checkpoint
    ``checkpoint`` names, or the post-hoc EMA ``ema_std``: see ``load_run_model``) with
    ``sampler_cfg`` (default: the run's own sampler) in ``steps`` steps (default: the sampler's).

    The one way the ``sample`` command (and the app) samples a finished run; the sampler is built
    as in training (``build_sampler``), so the same seed gives the training grid's images, and, in
    chunks of the metric's ``batch_size`` (250), the images ``evaluate`` scores.
    Class-conditional runs (``class_names``) sample ``class_label`` (default: every class in turn)
    with classifier-free guidance ``guidance_scale`` (``choose_guidance``); both are refused for
    unconditional runs. ``ema_std``: the post-hoc EMA of that width instead (``load_run_model``).
    unconditional runs. With ``guide``/``guide_checkpoint`` (``load_guide``) the scale is an
    autoguidance weight instead, for any run; ``guidance_interval`` limits guidance to a fraction of
    the trajectory (``choose_interval``).
    """
    from diffexp.models.build import build_sampler
    from diffexp.records.rundir import RunDir

    run = RunDir(run) if not isinstance(run, RunDir) else run
    run_cfg = run.config()
    if n < 1:
        raise DiffexpError(f"n={n}: must be at least 1")
    names = class_names(run)
    if names is None and class_label is not None:
        raise DiffexpError(f"class_label={class_label}: {run.path} is an unconditional run (no classes to ask for)")
    labels = requested_labels(names, n, class_label)
    guided_by = guide_name(guide, guide_checkpoint)
    guidance_scale = choose_guidance(guidance_scale, run_cfg, names, guided_by)
    interval = choose_interval(guidance_interval, names, guided_by)
    request = OmegaConf.merge(sampler_cfg or {}, {} if steps is None else {"steps": steps})
    sampler_cfg, steps = choose_sampler(request, run_cfg)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    guide_model = load_guide(run, names, guide, guide_checkpoint, device)
    model = load_run_model(run, device, checkpoint, metric_key=metric_key, ema_std=ema_std)
    sampler = build_sampler(sampler_cfg, run_cfg.scheduler, latent=model.vae is not None)
    check_steps(sampler, steps)
    images = generate(model.denoiser, sampler, n=n, steps=steps, seed=seed, batch_size=batch_size, vae=model.vae,
                      num_classes=len(names) if names else None,
                      labels=torch.from_numpy(labels) if labels is not None else None,
                      guidance_scale=guidance_scale, guide=guide_model, guidance_interval=interval, progress=progress)
    return Samples(images=images, labels=labels, sampler=sampler_name(sampler_cfg), steps=steps, seed=seed,
                   checkpoint=model.checkpoint)


def timesteps(sampler: SchedulerMixin, steps: int) -> torch.Tensor:
    """The timesteps ``steps`` steps of ``sampler`` visit, from a copy (the sampler itself is left unset)."""
    probe = copy.deepcopy(sampler)
    probe.set_timesteps(steps)
    return probe.timesteps


def check_steps(sampler: SchedulerMixin, steps: int) -> None:
    """Refuse, in one line and before any sampling, ``steps`` steps that ``sampler`` cannot take: too
    many for its schedule, or timesteps that repeat where it calls the network once per timestep
    (DPM-Solver++ with ``use_karras_sigmas`` on the cosine schedule rounds its first steps to the same
    t, and diffusers' step counter then runs past the end)."""
    if steps < 1:
        raise DiffexpError(f"sampler.steps={steps}: must be at least 1")
    try:
        t = timesteps(sampler, steps)
    except ValueError as e:
        raise DiffexpError(f"sampler.steps={steps}: {first_line(e)}") from None
    if getattr(sampler, "order", 1) == 1 and len(t) > 1 and bool((t[1:] >= t[:-1]).any()):
        shown = ", ".join(f"{float(v):g}" for v in t[:4])
        raise DiffexpError(f"sampler={type(sampler).__name__}: its options give repeated timesteps on this noise "
                           f"schedule ({shown}, ... for {steps} steps), which it cannot step through; change "
                           "sampler.scheduler.* (e.g. use_karras_sigmas, timestep_spacing) or the sampler")


def network_evaluations(sampler: SchedulerMixin, steps: int) -> int:
    """How many times ``steps`` steps of ``sampler`` call the network per image (NFE): one per entry of
    its ``timesteps`` (Heun-type samplers list each inner step twice: 2 x steps - 1)."""
    return len(timesteps(sampler, steps))


def sampler_name(sampler_cfg) -> str:
    """A short name of a sampler config: its ``name`` (``ddim``, ``edm_heun``), or for configs saved
    before names its scheduler class without ``Scheduler`` (``dpmsolvermultistep``)."""
    if sampler_cfg.get("name"):
        return str(sampler_cfg.name)
    target = str(sampler_cfg.scheduler._target_).removesuffix(".from_config")
    return target.rsplit(".", 1)[-1].replace("Scheduler", "").lower()


def grid(images: np.ndarray, upscale_to: int = 64, padding: int = 2, nrow: int | None = None) -> Image.Image:
    """A grid of uint8 N x H x W x C images (near-square unless ``nrow`` images per row are asked
    for), tiles upscaled (nearest) to at least ``upscale_to`` px and separated by gray lines."""
    tiles = torch.from_numpy(images).permute(0, 3, 1, 2)
    factor = max(1, upscale_to // images.shape[1])
    tiles = tiles.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    canvas = make_grid(tiles, nrow=nrow or math.ceil(math.sqrt(len(tiles))), padding=padding, pad_value=128)
    array = canvas.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if images.shape[-1] == 1 else array)


def save_npz(out: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``out`` as a compressed ``.npz``, atomically."""
    from diffexp.records.rundir import atomic_path

    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def save_samples(samples: Samples, out: Path) -> Path:
    """Write ``samples`` as the ``sample`` command does: ``out`` (an ``.npz`` holding ``images``, and
    ``labels`` for a class-conditional run) and a grid PNG beside it, each atomically; returns the grid's path."""
    arrays = {"images": samples.images} | ({"labels": samples.labels} if samples.labels is not None else {})
    save_npz(out, **arrays)
    grid_file = Path(out).with_suffix(".png")
    save_grid(samples.images, grid_file)
    return grid_file


def save_grid(images: np.ndarray, path: Path, nrow: int | None = None) -> Image.Image:
    """Write ``grid(images)`` as a PNG at ``path`` (atomically); returns the image."""
    from diffexp.records.rundir import atomic_path

    image = grid(images, nrow=nrow)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return image
