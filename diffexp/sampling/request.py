"""A sampling request as a form gives it (the app's controls, its API): each field checked and typed,
a DiffexpError naming the one that is off. Empty steps, guidance and checkpoint mean the run's own,
as they do on the sample command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffexp import DiffexpError

OWN = "own"  # the sampler menu's value for "the run's own sampler"
MODEL = "model"  # the weights menu's value for "the run's model/" (an interrupted run: its newest checkpoint)


@dataclass
class Settings:
    """One sampling request as the page's controls give it."""

    sampler: str  # OWN or a conf/sampler name
    steps: int | None  # None: the sampler's own
    seed: int
    n: int
    class_label: int | None = None
    guidance_scale: float | None = None  # None: the run's own
    checkpoint: str | int | None = None  # None: the final model
    guide: str | None = None  # a run of the runs folder (its key), for autoguidance
    guide_checkpoint: str | int | None = None
    guidance_interval: tuple[float, float] | None = None
    ema_std: float | None = None  # a post-hoc EMA width (runs with phema snapshots); None: the EMA weights


def blank(value) -> bool:
    """An input left empty (the API's None, a cleared text field)."""
    return value is None or (isinstance(value, str) and not value.strip())


def checkpoint_value(what: str, value) -> str | int | None:
    """A checkpoint input: empty (None), a step (an int) or a word (``last``, ``best``)."""
    if blank(value) or value == MODEL:
        return None
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if text in ("last", "best"):
        return text
    raise DiffexpError(f"{what}={value}: expected a checkpoint step, last or best (empty: the final model)")


def interval_value(value) -> tuple[float, float] | None:
    """The guidance interval input ``lo, hi`` (empty: the whole trajectory)."""
    if blank(value):
        return None
    try:
        lo, hi = (float(x) for x in str(value).strip("[]() ").split(","))
    except ValueError:
        raise DiffexpError(f"guidance interval={value}: give two fractions 'lo, hi' (e.g. 0.2, 0.7)") from None
    return lo, hi


def settings(sampler, steps, seed, n, class_label, guidance_scale, checkpoint=None, guide=None,
             guide_checkpoint=None, guidance_interval=None, ema_std=None, *, max_images: int) -> Settings:
    """The controls' values checked and typed (a DiffexpError names the one that is off); empty
    steps, guidance and checkpoint mean the run's own."""
    for what, value in (("steps", 1 if blank(steps) else steps), ("seed", seed), ("number of images", n)):
        if value is None or value != int(value):
            raise DiffexpError(f"{what}: give a whole number")
    if not 1 <= int(n) <= max_images:
        raise DiffexpError(f"number of images={n}: from 1 to {max_images}")
    if not blank(steps) and int(steps) < 1:  # (checked here, not by the field: gradio's own check is a traceback)
        raise DiffexpError(f"steps={steps}: at least 1 (empty: the run's own)")
    return Settings(sampler or OWN, None if blank(steps) else int(steps), int(seed), int(n),
                    None if blank(class_label) else int(class_label),
                    None if blank(guidance_scale) else float(guidance_scale),
                    checkpoint_value("checkpoint", checkpoint), None if blank(guide) else str(guide).strip(),
                    checkpoint_value("guide checkpoint", guide_checkpoint), interval_value(guidance_interval),
                    None if blank(ema_std) or ema_std == 0 else float(ema_std))
