"""``python -m diffexp.app [app.runs=outputs] [app.host=127.0.0.1] [app.port=7860] [app.share=false]``.

A Gradio page over the run directories below ``app.runs``, all read through ``diffexp.records.rundir``:

- the runs table (name, status, steps, wall time, final loss, best quality metric, dataset, model,
  objective), read again every ``app.refresh_s`` seconds while runs train;
- the selected run's loss and quality curves, its sample grids through training (a slider), its
  config and ``run.json``;
- its evaluation sweep (``eval.json``) as ``python -m diffexp.compare`` reports it, through
  ``diffexp.report.evaluations``: quality against each setting that varies, every setting's numbers
  and the best setting with its interval over sampling seeds;
- sampling through ``diffexp.sampling.generate.sample_run``, what ``python -m diffexp.sample`` uses (the same
  seed gives the same images), from the run's ``model/`` or any complete checkpoint (``last``, ``best``,
  a step; an interrupted run: its newest) or a post-hoc EMA width, downloadable as the sample command
  writes them (``.npz`` + grid PNG), with the run's own sampler, steps and guidance as defaults, a class
  for class-conditional runs, autoguidance by a guide run or checkpoint and a guidance interval (the
  API takes the same);
- two or more runs side by side, sampled with the same settings.

A folder that cannot be read is a message on the page, never a traceback, and the table goes on.
Gradio's analytics are off; the page needs no network.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from diffexp import DiffexpError, first_line
from diffexp.config import CONFIG_PATH, check_app_config, report_errors
from diffexp.models.build import sampler_config, sampler_names
from diffexp.records.catalog import primary_quality, quality_goal, run_dirs, summarize
from diffexp.records.rundir import RunDir, step_of
from diffexp.report.evaluations import SweepView, sweep_view
from diffexp.report.render import ARROW, fmt, shown_path, wall_time
from diffexp.sampling.generate import choose_guidance, class_names, sample_run, sampler_name, save_samples
from diffexp.sampling.request import MODEL, OWN, Settings, settings

log = logging.getLogger("diffexp.app")


# --- what the page shows, as plain data
def run_key(run: RunDir, root: Path) -> str:
    """How the page names a run: its path below ``root`` (the root's own name when it is the run)."""
    key = run.path.relative_to(root).as_posix()
    return run.path.name if key == "." else key


def find_run(root: Path, key: str | None) -> RunDir:
    """The run directory ``key`` names (see ``run_key``); a DiffexpError when nothing is chosen, the
    path leads outside ``root`` or the folder is not a run."""
    if not key:
        raise DiffexpError("no run selected: pick one in the runs table or the run menu")
    path = root if key == root.name and RunDir(root).exists() else (root / key).resolve()
    if not path.is_relative_to(root):
        raise DiffexpError(f"{key}: not below {root}")
    return RunDir(path).require()


def shown(error: Exception) -> str:
    """An exception as the one line the page shows."""
    return str(error) if isinstance(error, DiffexpError) else f"{type(error).__name__}: {first_line(error)}"


def reported(error: Exception) -> str:
    """``shown(error)``, and for an unexpected error (not a DiffexpError) its traceback on the console."""
    if not isinstance(error, DiffexpError):
        log.warning("%s", first_line(error), exc_info=error)
    return shown(error)


def refusal(message: str) -> gr.Error:
    """The error box the page shows (until closed) for a request it cannot do; the console gets no
    traceback (``reported`` logs the unexpected ones)."""
    return gr.Error(message, duration=None, print_exception=False)


def read_run(run: RunDir) -> tuple[DictConfig, dict]:
    """A run's config and run.json; a DiffexpError that names the file when one cannot be read."""
    return run.config(), run.info()


def objective(cfg: DictConfig) -> str:
    """What a run's loss measures, in short: its noise schedule option, prediction type and a loss
    weighting other than uniform (``linear, epsilon``; ``cosine, v_prediction, min_snr``)."""
    schedule = (cfg.get("choices") or {}).get("scheduler") or OmegaConf.select(cfg, "scheduler._target_")
    weighting = OmegaConf.select(cfg, "trainer.loss_weighting", default="uniform")
    weighting = None if weighting == "uniform" else weighting
    parts = [schedule, OmegaConf.select(cfg, "scheduler.prediction_type"), weighting]
    return ", ".join(str(p) for p in parts if p)


COLUMNS = ("run", "name", "status", "steps", "wall time", "final loss", "dataset", "model", "objective")


def table_row(key: str, summary: dict, cfg: DictConfig, primary: str | None) -> dict:
    """A run's row of the runs table: ``summarize``'s numbers as ``python -m diffexp.runs`` prints
    them, its dataset, model and objective, and the best value of the ``primary`` quality metric."""
    choices = cfg.get("choices") or {}
    row = {"run": key, "name": summary["name"] or "–", "status": summary["status"], "steps": fmt(summary["steps"]),
           "wall time": wall_time(summary["wall_time_s"]), "final loss": fmt(summary["final_loss"]),
           "dataset": choices.get("dataset", "–"), "model": choices.get("model", "–"), "objective": objective(cfg)}
    if primary:
        row[f"best {primary} {ARROW[quality_goal(primary)]}"] = fmt(summary.get(f"best {primary}"))
    return row


def runs_table(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per run directory below ``root`` (in path order) and a message for each one that
    could not be read (its row says ``unreadable``)."""
    read, problems = [], []
    for run in run_dirs(root):
        try:
            cfg, _ = read_run(run)
            read.append((run, summarize(run), cfg))
        except Exception as e:  # noqa: BLE001 - one bad folder must not take the table down
            problems.append(f"`{run_key(run, root)}`: {shown(e)}")
            read.append((run, None, None))
    primary = primary_quality([{k[len("best "):] for k in s if k.startswith("best eval/")} for _, s, _ in read if s])
    rows = [table_row(run_key(run, root), s, cfg, primary) if s else {"run": run_key(run, root), "status": "unreadable"}
            for run, s, cfg in read]
    columns = [*COLUMNS[:6], *([f"best {primary} {ARROW[quality_goal(primary)]}"] if primary else []), *COLUMNS[6:]]
    return pd.DataFrame(rows, columns=columns).fillna("–"), problems


def curves(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run's loss curve and its quality-metric curves from its metrics rows, each as long-format
    (step, value, metric) frames for a line plot."""
    columns = ["step", "value", "metric"]
    loss = [(r["step"], r["train/loss"], "train/loss") for r in rows if "train/loss" in r]
    quality = [(r["step"], v, k) for r in rows for k, v in r.items() if quality_goal(k) and isinstance(v, (int, float))]
    return pd.DataFrame(loss, columns=columns), pd.DataFrame(quality, columns=columns)


def sampler_configs() -> dict[str, DictConfig]:
    """The samplers the sample command offers (``conf/sampler/*.yaml``; the run's own is ``OWN``)."""
    return {name: sampler_config(name) for name in sampler_names()}


@dataclass
class Drawn:
    """What one sampling gave: the files the sample command would write, and what it took."""

    npz: Path
    grid: Path
    shape: tuple[int, ...]
    sampler: str
    steps: int
    seconds: float


def draw(run: RunDir, request: Settings, samplers: dict[str, DictConfig], out_dir: Path,
         device: str | None = None, guide: RunDir | None = None) -> Drawn:
    """Sample ``run`` as ``python -m diffexp.sample`` would with these settings, timed, and write the
    images as it does (``.npz`` and grid PNG) into ``out_dir``. The class goes to class-conditional
    runs only, and so does the guidance scale unless a guide (``guide``, ``request.guide_checkpoint``)
    autoguides. A ``request.checkpoint`` is handed to ``sample_run``'s ``checkpoint``."""
    cfg, _ = read_run(run)  # a bad config.yaml is named as such
    conditional = class_names(run) is not None
    guided = guide is not None or request.guide_checkpoint is not None
    sampler_cfg = None if request.sampler == OWN else samplers[request.sampler]
    chosen = {"checkpoint": request.checkpoint} if request.checkpoint is not None else {}
    start = time.perf_counter()
    try:
        samples = sample_run(run, n=request.n, seed=request.seed, sampler_cfg=sampler_cfg, steps=request.steps,
                             class_label=request.class_label if conditional else None,
                             guidance_scale=request.guidance_scale if conditional or guided else None,
                             guide=str(guide.path) if guide is not None else None,
                             guide_checkpoint=request.guide_checkpoint,
                             guidance_interval=request.guidance_interval if conditional or guided else None,
                             device=device, ema_std=request.ema_std, **chosen)
    except DiffexpError as e:  # the guide named as the page names it
        if guide is None:
            raise
        raise DiffexpError(str(e).replace(f"guide={guide.path}", f"guide={request.guide}")) from None
    seconds = time.perf_counter() - start
    at = "" if samples.checkpoint is None else f"_ckpt{samples.checkpoint}"
    npz = out_dir / f"{cfg.get('name') or run.path.name}_{samples.sampler}_{samples.steps}steps_s{samples.seed}{at}.npz"
    grid_file = save_samples(samples, npz)
    return Drawn(npz, grid_file, samples.images.shape, samples.sampler, samples.steps, seconds)


def described(drawn: Drawn, request: Settings, device: str) -> str:
    """One line about a sampling: how many images, how, and how long it took."""
    n, h, w, _ = drawn.shape
    ema = f", post-hoc EMA σ_rel {request.ema_std:g}" if request.ema_std is not None else ""
    return (f"{n} images of {h}×{w} px, {drawn.sampler} in {drawn.steps} steps, seed {request.seed}{ema}: "
            f"{drawn.seconds:.2f} s on {device}")


# --- the page
class Page:
    """The handlers behind the page's controls, over one runs folder."""

    def __init__(self, cfg: DictConfig, samplers: dict[str, DictConfig], scratch: Path):
        self.root = Path(str(cfg.app.runs)).expanduser().resolve()
        self.refresh_s = float(cfg.app.refresh_s)
        self.max_images = int(cfg.app.max_images)
        self.device = cfg.app.device or None
        self.samplers = samplers
        self.scratch = scratch
        self.plotting = threading.Lock()  # matplotlib's pyplot is not thread-safe, gradio's handlers run in threads

    @property
    def device_name(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def read_table(self) -> tuple[pd.DataFrame, str]:
        """The runs table and a note on what could not be read (or that there is nothing yet)."""
        table, problems = runs_table(self.root)
        if table.empty:
            return table, f"No run directories below `{shown_path(str(self.root))}` yet."
        note = "\n".join(f"- ⚠ {p}" for p in problems)
        return table, note

    def runs(self) -> dict:
        """The runs table as records (one dict per run, the page's columns) and what could not be read."""
        table, problems = runs_table(self.root)
        return {"root": str(self.root), "runs": table.to_dict(orient="records"), "problems": problems}

    def refresh(self, selected: str | None, known: list[str], seen: tuple | None):
        """The timer's tick: the table again; the run menus and the selected run's view only when they changed."""
        table, note = self.read_table()
        keys = list(table["run"]) if not table.empty else []
        menus = [gr.skip()] * 3 if keys == known else [gr.update(choices=keys)] * 2 + [
            gr.update(choices=[("none", ""), *[(k, k) for k in keys]])]  # the guide menu
        was, now = seen or (None, None), self.view_signature(selected, table)
        view = [gr.skip()] * len(VIEW) if now[0] == was[0] else self.show_run(selected)
        evaluations = [gr.skip()] * (len(EVALUATIONS) + 1)  # (+ the tab's details, shown with results)
        if now[1] != was[1]:  # plots drawn again only when eval.json changed
            evaluations = self.evaluations(selected)
            evaluations.append(evaluated(evaluations[-1]))
        return table, note, *menus, keys, *view, *evaluations, now

    def view_signature(self, selected: str | None, table: pd.DataFrame) -> tuple:
        """What decides whether the selected run's views are out of date: for the run view its table row
        and grid count, for the evaluations its eval.json (run, modification time); (None, None) for none."""
        if not selected or table.empty or selected not in set(table["run"]):
            return None, None
        row = table[table["run"] == selected].iloc[0]
        try:
            found = find_run(self.root, selected)
            grids = len(found.sample_grids())
            changed = found.eval_file.stat().st_mtime_ns if found.eval_file.is_file() else None
        except Exception:  # noqa: BLE001 - shown by show_run
            grids, changed = -1, None
        return (*row.tolist(), grids), (selected, changed)

    def show_run(self, run: str | None) -> list:
        """The view of run ``run`` (VIEW's order): a status line, curves, grids, config and run.json;
        a run that cannot be read is a message in the status line and an empty view."""
        try:
            found = find_run(self.root, run)
            (cfg, info), rows, grids = read_run(found), found.metrics(), found.sample_grids()
        except Exception as e:  # noqa: BLE001 - shown on the page instead
            return [f"⚠ **{run}**: {shown(e)}" if run else "Pick a run in the table or the menu.",
                    None, gr.update(value=None, visible=False), gr.update(maximum=1, value=0, visible=False),
                    None, "", None]
        loss, quality = curves(rows)
        last = len(grids) - 1
        status = (f"**{cfg.get('name') or found.path.name}** · {info.get('status', 'empty')} · "
                  f"{max((r['step'] for r in rows), default=0)} steps · `{shown_path(str(found.path))}`")
        if quality.empty:
            status += " · no quality metric logged"
        return [status, loss, gr.update(value=quality, visible=not quality.empty),
                gr.update(maximum=max(last, 1), value=max(last, 0), visible=last > 0),
                self.grid_at(run, last), OmegaConf.to_yaml(cfg), info]

    def evaluations(self, run: str | None) -> list:
        """The run's evaluation sweep (EVALUATIONS' order; ``report.evaluations.sweep_view``): a line with the
        best setting and its interval over sampling seeds as compare names it, compare's plots of quality
        against each setting that varies (file, title), every setting's numbers and the best one's (None
        without results); one line when the run has none or cannot be read. Nothing is written into the run."""
        try:
            found = find_run(self.root, run)
            with self.plotting:
                view = sweep_view(found, run, self.out_dir())
        except Exception as e:  # noqa: BLE001 - shown on the page instead
            view = SweepView(f"⚠ **{run}**: {shown(e)}" if run else "Pick a run in the table or the menu.")
        return [view.line, view.plots, pd.DataFrame(view.rows, columns=view.header), view.best]

    def grid_at(self, run: str | None, index: float | None):
        """Run ``run``'s sample grid number ``index`` (oldest first), labelled with its training step."""
        try:
            grids = find_run(self.root, run).sample_grids()
            path = grids[int(index or 0)] if 0 <= int(index or 0) < len(grids) else None
        except Exception:  # noqa: BLE001 - the status line already says why
            path = None
        if path is None:
            return gr.update(value=None, label="sample grid (none yet)")
        # as an image, not a path: gradio serves files only from folders it is told to, and runs may be anywhere
        return gr.update(value=Image.open(path), label=f"sample grid at step {step_of(path)}")

    def controls(self, key: str | None) -> list:
        """The sampling controls for the selected run (sampler, steps, class, guidance, weights): its own
        sampler named in the menu, its steps, a class for class-conditional runs only, its own guidance
        scale (``choose_guidance``; empty for an unconditional run, which only a guide guides), and its
        model/ or any of its complete checkpoints."""
        try:
            run = find_run(self.root, key)
            cfg, classes = run.config(), class_names(run)
            own_name, own_steps = sampler_name(cfg.sampler), int(cfg.sampler.steps)
            guidance = choose_guidance(None, cfg, classes)
            steps = [step_of(c) for c in run.checkpoints()]
        except Exception:  # noqa: BLE001 - the run view says why
            return [gr.skip()] * 5
        menu = [(f"the run's own ({own_name})", OWN), *[(n, n) for n in self.samplers]]
        conditional = classes is not None
        return [gr.update(choices=menu, value=OWN), own_steps,
                gr.update(choices=[(c, i) for i, c in enumerate(classes or [])], value=0 if conditional else None,
                          visible=conditional),
                guidance if conditional else None,
                gr.update(choices=weights_menu(run.model_dir.is_dir(), steps), value=MODEL)]

    def sampler_steps(self, key: str | None, sampler: str):
        """The default step count of the sampler just chosen (the run's own, or a conf/sampler one)."""
        if sampler != OWN:
            return int(self.samplers[sampler].steps)
        try:
            return int(find_run(self.root, key).config().sampler.steps)
        except Exception:  # noqa: BLE001 - the run view says why
            return gr.skip()

    def guide_run(self, request: Settings) -> RunDir | None:
        """The run ``request.guide`` names in the runs folder (None without one), named ``guide=`` when
        it cannot be found."""
        if request.guide is None:
            return None
        try:
            return find_run(self.root, request.guide)
        except DiffexpError as e:
            raise DiffexpError(f"guide={request.guide}: {e}") from None

    def sample(self, run, sampler, steps, seed, n, class_label=None, guidance_scale=None, checkpoint=None, guide=None,
               guide_checkpoint=None, guidance_interval=None, ema_std=None):
        """Sample the selected run: the grid, a line on how, and the .npz and PNG to download. Empty
        steps, class and guidance: the run's own (every class in turn)."""
        try:
            request = settings(sampler, steps, seed, n, class_label, guidance_scale, checkpoint, guide,
                               guide_checkpoint, guidance_interval, ema_std, max_images=self.max_images)
            drawn = draw(find_run(self.root, run), request, self.samplers, self.out_dir(), self.device,
                         self.guide_run(request))
        except Exception as e:  # noqa: BLE001 - a message on the page, never a traceback
            raise refusal(reported(e)) from None
        return str(drawn.grid), described(drawn, request, self.device_name), [str(drawn.npz), str(drawn.grid)]

    def compare(self, runs, sampler, steps, seed, n, class_label=None, guidance_scale=None, checkpoint=None,
                guide=None, guide_checkpoint=None, guidance_interval=None, ema_std=None):
        """Sample each of the chosen runs with the same settings: their grids, captioned, and a line
        per run on how long it took (or why it could not be sampled)."""
        keys = list(runs or [])
        if len(keys) < 2:
            raise refusal("pick two or more runs to put side by side")
        try:
            request = settings(sampler, steps, seed, n, class_label, guidance_scale, checkpoint, guide,
                               guide_checkpoint, guidance_interval, ema_std, max_images=self.max_images)
            guide_run = self.guide_run(request)
        except Exception as e:  # noqa: BLE001
            raise refusal(shown(e)) from None
        gallery, lines = [], []
        for key in keys:
            try:
                drawn = draw(find_run(self.root, key), request, self.samplers, self.out_dir(), self.device, guide_run)
            except Exception as e:  # noqa: BLE001 - the other runs still show
                lines.append(f"- ⚠ `{key}`: {reported(e)}")
                continue
            gallery.append((str(drawn.grid), key))
            lines.append(f"- `{key}`: {described(drawn, request, self.device_name)}")
        if not gallery:
            raise refusal("none of the runs could be sampled: " + "; ".join(lines))
        return gallery, "\n".join(lines)

    def out_dir(self) -> Path:
        """A fresh folder for one sampling's files (gradio copies what it serves into its cache)."""
        return Path(tempfile.mkdtemp(dir=self.scratch))


def weights_menu(has_model: bool, steps: list[int]) -> list[tuple[str, str]]:
    """The weights menu of a run: its model/ (or, without one, its newest checkpoint), the newest and
    best checkpoint, and each complete checkpoint by step."""
    first = "model/ (final)" if has_model else "newest checkpoint (no model/ yet)"
    return [(first, MODEL), ("last checkpoint", "last"), ("best checkpoint (by its quality metric)", "best"),
            *[(f"checkpoint {s}", str(s)) for s in reversed(steps)]]


# The selected run's views, as Page.show_run and Page.evaluations return them.
VIEW = ("status", "loss", "quality", "grid_slider", "grid", "config", "info")
EVALUATIONS = ("evaluations_status", "evaluation_plots", "evaluation_table", "best_setting")


def evaluated(best: dict | None):
    """The Evaluations tab's plots and tables shown only for a run with evaluate results (``best``)."""
    return gr.update(visible=best is not None)


def build(page: Page) -> gr.Blocks:
    """The page: runs table and run menu on top; tabs for the run, its evaluations, sampling and side by side."""
    with gr.Blocks(title="diffexp runs", analytics_enabled=False, fill_width=True, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## diffexp runs\nRun directories below `{shown_path(str(page.root))}`, "
                    f"read again every {page.refresh_s:g} s.")
        table = gr.Dataframe(label="runs (click a row to select it)", interactive=False, max_height=320,
                             elem_id="runs-table")
        note = gr.Markdown(elem_id="runs-note")
        known = gr.State([])
        seen = gr.State(None)
        with gr.Row():
            run_menu = gr.Dropdown(label="run", choices=[], value=None, allow_custom_value=True, elem_id="run-menu",
                                   scale=3)
            status = gr.Markdown("Pick a run in the table or the menu.", elem_id="run-status")
        with gr.Tabs():
            with gr.Tab("Run"):
                with gr.Row():
                    loss = gr.LinePlot(x="step", y="value", label="train/loss", height=260)
                    quality = gr.LinePlot(x="step", y="value", color="metric", label="quality", height=260)
                with gr.Row():
                    with gr.Column():
                        grid_slider = gr.Slider(0, 1, value=0, step=1, label="sample grids through training",
                                                visible=False)
                        grid = gr.Image(label="sample grid", format="png", interactive=False, height=320)
                    with gr.Column():
                        info = gr.JSON(label="run.json")
                config = gr.Code(label="config.yaml", language="yaml", interactive=False, max_lines=30)
            with gr.Tab("Evaluations"):
                evaluations_status = gr.Markdown("Pick a run in the table or the menu.", elem_id="evaluations-status")
                with gr.Column(visible=False) as evaluation_details:
                    evaluation_plots = gr.Gallery(label="quality against each setting that varies (as compare draws "
                                                  "it)", columns=2, format="png", object_fit="contain", height="max-content",
                                                  elem_id="evaluation-plots")
                    evaluation_table = gr.Dataframe(label="every evaluation setting (mean ± 95% CI over sampling "
                                                    "seeds)", interactive=False, elem_id="evaluation-table")
                    with gr.Accordion("the best setting, as compare's summary.json holds it", open=False):
                        best_setting = gr.JSON(elem_id="best-setting")
            with gr.Tab("Sample"):
                with gr.Row():
                    with gr.Column(scale=1):
                        sampler = gr.Dropdown([("the run's own", OWN), *[(n, n) for n in page.samplers]], value=OWN,
                                              label="sampler", elem_id="sampler")
                        steps = gr.Number(label="steps", precision=0, elem_id="steps")
                        seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                        n = gr.Slider(1, page.max_images, value=min(16, page.max_images), step=1,
                                      label="number of images", elem_id="n")
                        # custom values: the API asks for a class id before any run's classes are listed
                        class_label = gr.Dropdown([], label="class", visible=False, allow_custom_value=True,
                                                  elem_id="class")
                        guidance_scale = gr.Number(None, minimum=0, label="guidance scale (empty: the run's own; "
                                                   "1: none; with a guide: its weight w)", elem_id="guidance")
                        checkpoint = gr.Dropdown(weights_menu(True, []), value=MODEL, label="weights",
                                                 allow_custom_value=True, elem_id="checkpoint")
                        with gr.Accordion("post-hoc EMA and autoguidance", open=False):
                            ema_std = gr.Number(None, label="post-hoc EMA σ_rel (empty: the EMA weights; runs with "
                                                "phema snapshots)", minimum=0, elem_id="ema-std")
                            guide = gr.Dropdown([], label="guide run (autoguidance; empty: none)", value=None,
                                                allow_custom_value=True, elem_id="guide")
                            guide_checkpoint = gr.Textbox(label="guide checkpoint (empty: the guide's final model; "
                                                          "alone: this run's checkpoint)", elem_id="guide-checkpoint")
                            guidance_interval = gr.Textbox(label="guidance interval 'lo, hi' (fractions of the "
                                                           "trajectory; empty: all)", elem_id="guidance-interval")
                        sample_button = gr.Button("Sample", variant="primary", elem_id="sample-button")
                    with gr.Column(scale=2):
                        sampled = gr.Image(label="samples", format="png", interactive=False, elem_id="sampled",
                                           height=420)
                        sampled_info = gr.Markdown(elem_id="sampled-info")
                        downloads = gr.File(label="download (.npz as python -m diffexp.sample writes it, grid PNG)",
                                            file_count="multiple", interactive=False)
            with gr.Tab("Side by side"):
                gr.Markdown("The chosen runs, sampled with the settings of the Sample tab (same seed for all).")
                compare_menu = gr.Dropdown(label="runs", choices=[], multiselect=True, allow_custom_value=True,
                                           elem_id="compare-menu")
                compare_button = gr.Button("Sample side by side", variant="primary", elem_id="compare-button")
                compared = gr.Gallery(label="side by side", columns=4, format="png", elem_id="compared",
                                      object_fit="contain")
                compared_info = gr.Markdown(elem_id="compared-info")

        view = [status, loss, quality, grid_slider, grid, config, info]  # VIEW's order
        evaluations = [evaluations_status, evaluation_plots, evaluation_table, best_setting]  # EVALUATIONS' order
        controls = [sampler, steps, class_label, guidance_scale, checkpoint]
        settings_in = [sampler, steps, seed, n, class_label, guidance_scale, checkpoint, guide, guide_checkpoint,
                       guidance_interval, ema_std]

        tick = dict(fn=page.refresh, inputs=[run_menu, known, seen],
                    outputs=[table, note, run_menu, compare_menu, guide, known, *view, *evaluations, evaluation_details,
                             seen],
                    show_progress="hidden", api_visibility="private")
        demo.load(**tick)
        gr.Timer(max(page.refresh_s, 0.1), active=page.refresh_s > 0).tick(**tick)
        gr.api(page.runs, api_name="list_runs")
        table.select(select_row, outputs=run_menu, api_visibility="private")
        run_menu.change(page.show_run, inputs=run_menu, outputs=view, api_name="show_run").then(
            page.controls, inputs=run_menu, outputs=controls, api_visibility="private")
        run_menu.change(page.evaluations, inputs=run_menu, outputs=evaluations, api_name="evaluations").then(
            evaluated, inputs=best_setting, outputs=evaluation_details, api_visibility="private")
        grid_slider.release(page.grid_at, inputs=[run_menu, grid_slider], outputs=grid, api_visibility="private")
        sampler.input(page.sampler_steps, inputs=[run_menu, sampler], outputs=steps, api_visibility="private")
        sample_button.click(page.sample, inputs=[run_menu, *settings_in], outputs=[sampled, sampled_info, downloads],
                            api_name="sample")
        compare_button.click(page.compare, inputs=[compare_menu, *settings_in], outputs=[compared, compared_info],
                             api_name="compare")
    return demo


def select_row(event: gr.SelectData) -> str:
    """The run of the clicked table row (its first column)."""
    return event.row_value[0]


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="app")
def main(cfg: DictConfig) -> None:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # Blocks(analytics_enabled=False) and what gradio starts itself
    with report_errors():
        check_app_config(cfg)
        with tempfile.TemporaryDirectory(prefix="diffexp-app-") as scratch:
            page = Page(cfg, sampler_configs(), Path(scratch))
            log.info("serving %s on http://%s:%s (Ctrl-C stops)", page.root, cfg.app.host, cfg.app.port)
            build(page).launch(server_name=str(cfg.app.host), server_port=int(cfg.app.port), share=bool(cfg.app.share),
                               footer_links=["api"], quiet=False)


if __name__ == "__main__":
    main()
