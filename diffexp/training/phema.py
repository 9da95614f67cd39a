"""Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
CVPR 2024, section 3): power-function averages of the weights tracked during training, snapshots
of them kept in the run directory, and any other average width reconstructed after training.

A power-function EMA of exponent ``gamma`` at time ``t`` (in optimizer steps) weighs the weights of
time ``tau <= t`` by ``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)``; its relative width
``sigma_rel`` (the profile's standard deviation over ``t``) is ``sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))``.
Tracked with ``beta_t = (1 - 1/t)^(gamma + 1)`` per step, the average weighs the weights of step
``tau`` by exactly ``(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)``, the profile's integral over
``(tau - 1, tau]``: each snapshot is the continuous profile over the piecewise-constant trajectory.
Folding the steps ``(a, b]`` into one update multiplies their betas to ``(a / b)^(gamma + 1)``, which
is the same profile with the weights of ``(a, b]`` represented by step ``b``'s, so an update every N
steps keeps the maths exact for the trajectory it saw.

Reconstruction: the profile of width ``sigma`` at step ``t`` is projected (least squares in L2 over
``tau``) onto the snapshots' profiles, using their closed-form inner products; the same
coefficients combine the snapshots' weights.

Layout in the run directory: ``phema/std0.050-step0000500.safetensors`` (one tracked profile at
one step; metadata ``std``, ``t``), ``phema/reconstructed/ema_std0.07-step0001500.safetensors``
(a reconstruction, fp32, cached).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from diffexp import DiffexpError

SNAPSHOT_RE = re.compile(r"std(\d+\.\d+)-step(\d{7})\.safetensors")
MAX_STD = 0.3  # sigma_rel of a power-function profile peaks at ~0.3003 (gamma = (sqrt(5) - 3) / 2)
MAX_PROFILE_ERROR = 0.05  # reconstructable: the target profile's relative L2 error of projection is at most this
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ maths

def std_to_exp(std: float) -> float:
    """The exponent gamma of the power-function profile of relative width ``std`` (0 < std < ~0.3003):
    the largest real root of ``gamma^3 + 7 gamma^2 + (16 - 1/std^2) gamma + (12 - 1/std^2) = 0``
    (``std^2 = (gamma+1) / ((gamma+2)^2 (gamma+3))`` multiplied out)."""
    if not 0 < std < MAX_STD:
        raise ValueError(f"std={std}: a power-function profile has 0 < sigma_rel < {MAX_STD}")
    v = 1 / std ** 2
    roots = np.roots([1.0, 7.0, 16.0 - v, 12.0 - v])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def exp_to_std(gamma: float) -> float:
    """The relative width sigma_rel of the power-function profile of exponent ``gamma`` (> -1)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, t_from: int, t_to: int) -> float:
    """The weight the average of time ``t_from`` keeps when the steps ``(t_from, t_to]`` are folded
    in: the product of ``beta_t = (1 - 1/t)^(gamma+1)`` over them, which telescopes to
    ``(t_from / t_to)^(gamma+1)`` (0 from time 0: the first update is the weights themselves)."""
    return (t_from / t_to) ** (gamma + 1) if t_to > 0 else 0.0


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """Inner products ``int p_a(tau) p_b(tau) dtau`` of power-function profiles ending at ``t_a`` and
    ``t_b`` (broadcast arrays): ``(ga+1)(gb+1) min(ta,tb)^(ga+gb+1) / ((ga+gb+1) ta^(ga+1) tb^(gb+1))``,
    written with the ratio of the times so that large ``t`` and ``gamma`` do not overflow."""
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * ratio ** exponent / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(t_in, std_in, t_out: float, std_out: float) -> tuple[np.ndarray, float]:
    """The least-squares coefficients ``x`` with ``sum_i x_i p_i`` closest (L2) to the profile of
    width ``std_out`` ending at ``t_out``, over the snapshot profiles ``(t_in[i], std_in[i])``; and
    the relative L2 error of that fit (0: exact)."""
    g_in = np.array([std_to_exp(s) for s in std_in])
    t_in = np.asarray(t_in, dtype=np.float64)
    g_out = std_to_exp(std_out)
    gram = profile_dot(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    rhs = profile_dot(t_in, g_in, t_out, g_out)
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    target = float(profile_dot(t_out, g_out, t_out, g_out))
    residual = max(target - 2 * x @ rhs + x @ gram @ x, 0.0)
    return x, math.sqrt(residual / target)


# ------------------------------------------------------------------------------------------------ tracking

class PowerEMA:
    """Power-function averages of the model's weights, one per tracked width (``ema_cfg.phema.std``).

    ``update(model, step)`` folds every optimizer step since the last update into one lerp per
    profile (``power_beta``), with time ``t = step + age`` (``age``: the parent's steps with
    ``init_from``), like ``EMA.update``. ``model`` is the widest profile (closest to the default
    EMA's width at the end of the default run): the run's sample grids, evaluation and ``model/``.
    """

    def __init__(self, model: torch.nn.Module, ema_cfg: DictConfig):
        self.stds = [float(s) for s in ema_cfg.phema.std]
        self.gammas = [std_to_exp(s) for s in self.stds]
        self.models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.stds]
        self.step = 0
        self.age = 0
        self.cfg = ema_cfg

    @property
    def model(self) -> torch.nn.Module:
        return self.models[max(range(len(self.stds)), key=self.stds.__getitem__)]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Bring every profile from its step up to optimizer step ``step`` (nothing to do if it is there)."""
        if step <= self.step:
            return
        current = [p.detach() for p in model.parameters()]
        for gamma, average in zip(self.gammas, self.models):
            kept = power_beta(gamma, self.step + self.age, step + self.age)
            torch._foreach_lerp_(list(average.parameters()), current, 1.0 - kept)
            for mine, theirs in zip(average.buffers(), model.buffers()):
                mine.copy_(theirs)
        self.step = step

    def save_snapshots(self, folder: Path, dtype: torch.dtype) -> None:
        """Write every profile at the current step as ``folder/std<s>-step<step>.safetensors``
        (parameters only, in ``dtype``; metadata: its width and time), each atomically."""
        from diffexp.records.rundir import atomic_path

        for std, average in zip(self.stds, self.models):
            tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in average.named_parameters()}
            with atomic_path(folder / snapshot_name(std, self.step)) as tmp:
                save_file(tensors, str(tmp), metadata={"std": repr(std), "t": str(self.step + self.age),
                                                       "step": str(self.step)})

    def state_dict(self) -> dict:
        return {"kind": "phema", "step": self.step, "age": self.age, "std": self.stds,
                "weights": [m.state_dict() for m in self.models]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "phema":
            raise DiffexpError("trainer.ema.kind=phema: the checkpoint holds another kind of EMA "
                               "(resume or start from it with its own trainer.ema.kind)")
        if [float(s) for s in state["std"]] != self.stds:
            raise DiffexpError(f"trainer.ema.phema.std={self.stds}: the checkpoint tracks {list(state['std'])}")
        for average, weights in zip(self.models, state["weights"]):
            average.load_state_dict(weights)
        self.step, self.age = int(state["step"]), int(state["age"])


def make_averages(model: torch.nn.Module, ema_cfg: DictConfig):
    """The averages a run keeps, by ``ema_cfg.kind`` (absent: ``ema``): ``(the one it samples,
    evaluates and exports, the power-function tracker or None)`` -- ``(EMA, None)``, ``(PowerEMA,
    the same PowerEMA)`` or, for ``ema+phema``, ``(EMA, PowerEMA)``."""
    from diffexp.training.state import EMA

    kind = ema_cfg.get("kind", "ema")
    if kind == "phema":
        tracker = PowerEMA(model, ema_cfg)
        return tracker, tracker
    return EMA(model, ema_cfg), PowerEMA(model, ema_cfg) if kind == "ema+phema" else None


def snapshot_name(std: float, step: int) -> str:
    return f"std{std:.3f}-step{step:07d}.safetensors"


def snapshot_dtype(ema_cfg: DictConfig) -> torch.dtype:
    return DTYPES[str(ema_cfg.phema.get("dtype", "float16"))]


def drop_snapshots_after(folder: Path, step: int) -> None:
    """A resume from ``step``: the snapshots an interrupted session wrote after it are removed (the
    resumed run writes them again)."""
    for path, _ in snapshots(folder):
        if int(SNAPSHOT_RE.fullmatch(path.name).group(2)) > step:
            path.unlink()


# ------------------------------------------------------------------------------------------------ reconstruction

def snapshots(folder: Path) -> list[tuple[Path, dict]]:
    """The snapshot files in ``folder`` with their metadata (``std``, ``t``, ``step`` as numbers), by step."""
    from safetensors import safe_open

    found = []
    for path in sorted(folder.glob("std*-step*.safetensors")) if folder.is_dir() else []:
        if SNAPSHOT_RE.fullmatch(path.name):
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            found.append((path, {"std": float(meta["std"]), "t": int(meta["t"]), "step": int(meta["step"])}))
    return sorted(found, key=lambda item: (item[1]["step"], item[1]["std"]))


def reconstructable_range(t_in, std_in, t_out: float) -> tuple[float, float] | None:
    """The widths whose profile at ``t_out`` the snapshots fit within ``MAX_PROFILE_ERROR`` (scanned
    in steps of 0.001); None if none."""
    ok = [s for s in np.arange(0.001, MAX_STD, 0.001) if solve_coefficients(t_in, std_in, t_out, s)[1] <= MAX_PROFILE_ERROR]
    return (float(min(ok)), float(max(ok))) if ok else None


def reconstruct(run, std: float, step: int | None = None) -> dict[str, torch.Tensor]:
    """The parameters (fp32, CPU) of the power-function EMA of width ``std`` at optimizer step
    ``step`` (default: the run's last snapshot), a linear combination of the run's snapshots up to
    that step. Cached in ``phema/reconstructed/`` (the second call reads the file). Refused in one
    line: no snapshots, no snapshot at ``step``, or a width the snapshots cannot reconstruct."""
    from diffexp.records.rundir import RunDir, atomic_path

    run = RunDir(run) if not isinstance(run, RunDir) else run
    folder = run.path / "phema"
    found = snapshots(folder)
    if not found:
        raise DiffexpError(f"ema_std={std}: {run.path} has no post-hoc EMA snapshots (train with trainer.ema.kind=phema)")
    steps = sorted({m["step"] for _, m in found})
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise DiffexpError(f"ema_std={std}: no post-hoc EMA snapshot at step {step} (snapshots at steps "
                           f"{steps[0]} to {steps[-1]}, every {steps[1] - steps[0] if len(steps) > 1 else steps[0]})")
    used = [(path, m) for path, m in found if m["step"] <= step]
    cache = folder / "reconstructed" / f"ema_std{std:g}-step{step:07d}.safetensors"
    key = json.dumps([[p.name, m["t"]] for p, m in used])
    if cache.exists():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            if f.metadata().get("snapshots") == key:
                return load_file(str(cache))
    t_in, std_in = [m["t"] for _, m in used], [m["std"] for _, m in used]
    t_out = next(m["t"] for _, m in used if m["step"] == step)
    if not 0 < std < MAX_STD or solve_coefficients(t_in, std_in, t_out, std)[1] > MAX_PROFILE_ERROR:
        span = reconstructable_range(t_in, std_in, t_out)
        where = f"{span[0]:.3f} to {span[1]:.3f}" if span else "none"
        raise DiffexpError(f"ema_std={std}: outside the range the snapshots of {run.path} reconstruct at step {step} "
                           f"({where}; profile error <= {MAX_PROFILE_ERROR:.0%})")
    coefficients, _ = solve_coefficients(t_in, std_in, t_out, std)
    weights: dict[str, torch.Tensor] = {}
    for (path, _), c in zip(used, coefficients):
        for name, value in load_file(str(path)).items():
            term = value.double() * float(c)
            weights[name] = weights[name] + term if name in weights else term
    weights = {k: v.float().contiguous() for k, v in weights.items()}
    with atomic_path(cache) as tmp:
        save_file(weights, str(tmp), metadata={"std": repr(std), "step": str(step), "snapshots": key})
    return weights


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put reconstructed parameters ``weights`` into ``model`` (its buffers stay); a mismatch is one line."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    names = {name for name, _ in model.named_parameters()}
    if unexpected or names & set(missing):
        raise DiffexpError(f"ema_std: the snapshots do not fit the run's model (missing {sorted(names & set(missing))[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")
