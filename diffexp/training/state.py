"""What a checkpoint holds besides the model, the optimizer and the LR schedule: the EMA of the
weights and the loop's own state (step, the log interval's running sums)."""

from __future__ import annotations

import copy
import math

import torch
from omegaconf import DictConfig

from diffexp import DiffexpError


class EMA:
    """An exponential moving average of the model's weights: a copy of the model and a lerp.

    The decay of optimizer step ``s`` follows diffusers' ``EMAModel.get_decay`` (warm-up
    ``1 - (1 + s / inv_gamma) ** -power``, capped at ``decay``; 0 until ``update_after_step``).
    ``update(model, step)`` folds every optimizer step since the last update into one lerp, the old
    average weighted by the product of their decays, so updating every N steps keeps the decay
    schedule in optimizer steps (the skipped steps' weights are represented by the newest ones).
    Settings come from the config (a resume continues the same recipe), the average and its step
    from the checkpoint.
    """

    def __init__(self, model: torch.nn.Module, ema_cfg: DictConfig):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.step = 0  # the optimizer step the average has reached (saved in checkpoints)
        self.age = 0  # steps the average had taken before this run's step 0 (a parent's, with init_from)
        self.cfg = ema_cfg

    def decay_at(self, step: int) -> float:
        """The per-step decay of optimizer step ``step`` (counted on from the parent's steps with init_from)."""
        c = self.cfg
        n = step + self.age - c.update_after_step - 1
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
        return {"step": self.step, "age": self.age, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") == "phema":
            raise DiffexpError("trainer.ema.kind=ema: the checkpoint holds a power-function EMA "
                               "(resume or start from it with trainer.ema.kind=phema)")
        if "shadow_params" in state:  # a diffusers EMAModel, as checkpoints of diffexp 0.1 hold it
            with torch.no_grad():
                for mine, saved in zip(self.model.parameters(), state["shadow_params"]):
                    mine.copy_(saved)
            self.step = int(state["optimization_step"])
            return
        # (runs compiled before the EMA copied the plain module saved its weights under ``_orig_mod.``)
        self.model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["weights"].items()})
        self.step, self.age = int(state["step"]), int(state.get("age", 0))


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
