"""Sampling: every sampler integrates what the model was trained for, and every part of diffexp
(grids, ``sample``, ``evaluate``, the exported pipeline) gets the same images for the same seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_train
from diffusers import DDPMPipeline, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import BaseOutput
from omegaconf import OmegaConf
from PIL import Image

from diffexp import DiffexpError
from diffexp.config import CONFIG_PATH
from diffexp.models.build import build_sampler
from diffexp.records.rundir import RunDir
from diffexp.sampling.generate import generate, sample_run, save_grid

SAMPLERS = sorted(p.stem for p in (Path(CONFIG_PATH) / "sampler").glob("*.yaml"))
DDPM_SAMPLERS = [s for s in SAMPLERS if not s.startswith(("fm_", "edm_"))]


def objective_of(sampler: str) -> str:
    """A training schedule the sampler config can sample (auto: the DDPM family's own)."""
    return "flow_matching" if sampler.startswith("fm_") else "edm" if sampler.startswith("edm_") else "cosine"
MEAN, STD = 0.3, 0.2  # the "dataset": every pixel N(MEAN, STD^2), in the model's [-1, 1] units


class Output(BaseOutput):
    sample: torch.Tensor


class GaussianDenoiser(ModelMixin, ConfigMixin):
    """The exact denoiser of data whose pixels are independent N(MEAN, STD^2): E[x_0 | x_t] in closed
    form, returned as the scheduler's prediction type. A correct sampler turns noise into samples
    with that mean and spread, whatever its steps; the test needs no training."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, alphas_cumprod: list[float], prediction_type: str, sample_size: int = 8, in_channels: int = 1):
        super().__init__()
        self.abar = torch.tensor(alphas_cumprod, dtype=torch.float64)
        self.scale = torch.nn.Parameter(torch.ones(()))  # pipelines read the dtype and device from a parameter

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        lo = t.floor().long().clamp(0, len(self.abar) - 1)
        hi = (lo + 1).clamp(max=len(self.abar) - 1)
        abar = torch.lerp(self.abar[lo], self.abar[hi], (t - lo)).reshape(-1, 1, 1, 1).to(x.device)
        x = x.double()
        a, s2 = abar.sqrt(), (1 - abar)
        x0 = MEAN + a * STD**2 * (x - a * MEAN) / (abar * STD**2 + s2)  # E[x_0 | x_t]
        eps = (x - a * x0) / s2.sqrt()
        kind = self.config.prediction_type
        out = eps if kind == "epsilon" else a * eps - s2.sqrt() * x0 if kind == "v_prediction" else x0
        return Output(sample=out.float())


class GaussianFlow(ModelMixin, ConfigMixin):
    """The exact velocity E[eps - x_0 | x_t] of the Gaussian data on the flow-matching path
    x_t = (1 - t) x_0 + t eps; the network's timestep is t x 1000."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, class_labels=None):
        t = (torch.as_tensor(t, dtype=torch.float64).reshape(-1) / 1000).reshape(-1, 1, 1, 1).to(x.device)
        x = x.double()
        a, b = 1 - t, t
        x0 = MEAN + a * STD**2 * (x - a * MEAN) / (a**2 * STD**2 + b**2)
        eps = (x - a * x0) / b
        return Output(sample=(eps - x0).float())


class GaussianEDM(ModelMixin, ConfigMixin):
    """The exact EDM network output F for the Gaussian data: it sees c_in x and c_noise = ln(sigma) / 4,
    and c_skip x + c_out F is E[x_0 | x] for x = x_0 + sigma n."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1, sigma_data: float = 0.5):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x_in, c_noise, class_labels=None):
        sd = self.config.sigma_data
        sigma = torch.exp(4 * torch.as_tensor(c_noise, dtype=torch.float64).reshape(-1)).reshape(-1, 1, 1, 1)
        sigma = sigma.to(x_in.device)
        x = x_in.double() * (sigma**2 + sd**2).sqrt()
        x0 = MEAN + STD**2 * (x - MEAN) / (STD**2 + sigma**2)
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        return Output(sample=((x0 - c_skip * x) / c_out).float())


@pytest.mark.parametrize("scheduler,sampler,steps", [("flow_matching", "fm_euler", 200), ("flow_matching", "fm_heun", 50),
                                                     ("edm", "edm_euler", 200), ("edm", "edm_heun", 50),
                                                     ("edm", "edm_dpmpp", 100), ("flow_matching", "dpmpp_sde", 100), ("flow_matching", "dpmpp", 100),
                                                     ("edm", "edm_dpmpp_sde", 100)])
def test_flow_matching_and_edm_samplers_draw_from_the_trained_distribution(scheduler, sampler, steps):
    model = GaussianFlow() if scheduler == "flow_matching" else GaussianEDM()
    scheduler_cfg = compose_config([f"scheduler={scheduler}"]).scheduler
    sampler_cfg = OmegaConf.load(Path(CONFIG_PATH) / "sampler" / f"{sampler}.yaml")
    images = generate(model, build_sampler(sampler_cfg, scheduler_cfg), n=64, steps=steps, seed=0)
    x = images.astype(np.float64) / 127.5 - 1
    assert x.mean() == pytest.approx(MEAN, abs=0.01)
    assert x.std() == pytest.approx(STD, abs=0.012)


def gaussian_model(scheduler: str, prediction_type: str) -> tuple[GaussianDenoiser, object]:
    cfg = compose_config([f"scheduler={scheduler}", f"scheduler.prediction_type={prediction_type}",
                          "scheduler.clip_sample=false"])
    from diffexp.models.build import build_noise_scheduler

    abar = build_noise_scheduler(cfg.scheduler).alphas_cumprod.tolist()
    return GaussianDenoiser(abar, prediction_type), cfg.scheduler


@pytest.mark.parametrize("scheduler,prediction_type", [("linear", "epsilon"), ("cosine", "v_prediction"),
                                                       ("linear", "sample")])
@pytest.mark.parametrize("sampler", [s for s in DDPM_SAMPLERS if s != "auto"])
def test_every_sampler_draws_from_the_trained_distribution(sampler, scheduler, prediction_type):
    model, scheduler_cfg = gaussian_model(scheduler, prediction_type)
    sampler_cfg = OmegaConf.load(Path(CONFIG_PATH) / "sampler" / f"{sampler}.yaml")
    # Deterministic samplers shrink the spread at few steps (a discretization error that vanishes with
    # more steps: 0.10 at 10 DDIM steps here, 0.19 at 200); at 200 they must be there.
    steps = 200 if sampler != "ddpm" else 1000
    images = generate(model, build_sampler(sampler_cfg, scheduler_cfg), n=64, steps=steps, seed=0)
    x = images.astype(np.float64) / 127.5 - 1  # back to the model's units
    assert x.mean() == pytest.approx(MEAN, abs=0.01)
    assert x.std() == pytest.approx(STD, abs=0.012)


def test_a_loop_without_the_input_scaling_gets_euler_wrong():
    """What DDPMPipeline's loop does with a Karras-style scheduler (no init_noise_sigma, no
    scale_model_input): the reason diffexp samples through its own pipeline."""
    model, scheduler_cfg = gaussian_model("linear", "epsilon")
    euler = build_sampler(OmegaConf.load(Path(CONFIG_PATH) / "sampler" / "euler.yaml"), scheduler_cfg)
    wrong = DDPMPipeline(unet=model, scheduler=euler)
    wrong.set_progress_bar_config(disable=True)
    x = wrong(batch_size=64, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="np").images
    x = x * 2 - 1
    assert abs(x.mean() - MEAN) > 0.1 or abs(x.std() - STD) > 0.1


def test_a_sampler_that_cannot_sample_the_schedule_is_refused():
    cfg = compose_config()
    edm = OmegaConf.create({"scheduler": {"_target_": "diffusers.EDMEulerScheduler"}, "steps": 10})
    with pytest.raises(DiffexpError, match="sampler=EDMEulerScheduler: cannot sample a model trained with DDPMScheduler"):
        build_sampler(edm, cfg.scheduler)
    with pytest.raises(DiffexpError, match="sampler.scheduler.no_such_option: not an option of DDIMScheduler"):
        build_sampler(OmegaConf.create({"scheduler": {"_target_": "diffusers.DDIMScheduler", "no_such_option": 1}}),
                      cfg.scheduler)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "ddpm"] + ["ddpm"])
def test_grids_sample_and_the_exported_pipeline_give_the_same_images(sampler, tmp_path, cache_dir):
    """For every sampler config: the training grid, `sample`'s images and the exported pipeline
    loaded by plain diffusers, all from the same weights and seed, are the same images."""
    run = tmp_path / "run"
    steps = "sampler.steps=3"
    run_train("debug=tiny", f"cache_dir={cache_dir}", "logger=none", f"sampler={sampler}", steps,
              "trainer.grid_size=4", f"scheduler={objective_of(sampler)}", "metric=none", run_dir=run)
    grid = np.asarray(Image.open(run / "samples" / "step_0000004.png"))
    samples = sample_run(run, n=4, seed=0)
    assert np.array_equal(np.asarray(save_grid(samples.images, tmp_path / "cli.png")), grid)
    pipe = DiffusionPipeline.from_pretrained(run / "model", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    steps = OmegaConf.load(run / "config.yaml").sampler.steps
    out = pipe(batch_size=4, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert np.array_equal(np.round(out * 255).astype(np.uint8), samples.images)
    cfg = OmegaConf.load(run / "config.yaml")
    assert json.loads((run / "model" / "model_index.json").read_text())["scheduler"][1] == \
        type(build_sampler(cfg.sampler, cfg.scheduler)).__name__


def test_sample_draws_in_the_chunks_evaluate_draws_in():
    # The same seed gives `evaluate`'s images only while both cut the images into the same chunks.
    sample = OmegaConf.load(Path(CONFIG_PATH) / "sample.yaml")
    metric = OmegaConf.load(Path(CONFIG_PATH) / "metric" / "base" / "common.yaml")
    assert sample.batch_size == metric.batch_size


def planted(run: Path) -> Path:
    """Make the run's model/ carry code that leaves a marker file when imported, and name it in
    model_index.json as plain diffusers would load it (trust_remote_code)."""
    marker = run / "IMPORTED"
    model = run / "model"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (model / "pipeline.py").write_text(code + "from diffusers import DDPMPipeline as DiffexpPipeline\n")
    (model / "scheduler" / "schedulers.py").write_text(code)
    index = json.loads((model / "model_index.json").read_text())
    index["_class_name"] = ["pipeline", "DiffexpPipeline"]
    (model / "model_index.json").write_text(json.dumps(index))
    return marker


def test_no_command_runs_code_from_a_run_folder(finished_run, cache_dir, tmp_path):
    from conftest import run_main

    from diffexp.app import OWN, Settings, draw

    marker = planted(finished_run)
    run_main("sample", f"run={finished_run}", "n=2", f"out={tmp_path / 's.npz'}", check=True)
    run_main("evaluate", f"run={finished_run}", "metric.num_samples=4", "metric.num_real=8", "metric.batch_size=4",
             f"cache_dir={cache_dir}", check=True)
    draw(RunDir(finished_run), Settings(OWN, 2, 0, 2), {}, tmp_path)
    assert not marker.exists()


def test_a_model_folder_naming_a_class_from_elsewhere_is_one_line(finished_run, tmp_path):
    from conftest import run_main

    index_file = finished_run / "model" / "model_index.json"
    index = json.loads(index_file.read_text())
    index["scheduler"] = ["schedulers", "os"]  # a module attribute that is no scheduler
    index_file.write_text(json.dumps(index))
    result = run_main("sample", f"run={finished_run}", "n=2", f"out={tmp_path / 's.npz'}")
    assert result.returncode == 2 and "error: " in result.stderr and "scheduler is schedulers.os" in result.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-5"])
def test_a_guidance_scale_that_is_no_scale_is_one_line(finished_run, value):
    from conftest import run_main

    for command in ("sample", "evaluate"):
        result = run_main(command, f"run={finished_run}", f"guidance_scale={value}")
        assert result.returncode == 2 and f"error: guidance_scale={value.replace('inf', 'inf')}" in result.stderr, result.stderr


def test_evaluate_refuses_guidance_on_an_unconditional_run(finished_run):
    from conftest import run_main

    result = run_main("evaluate", f"run={finished_run}", "guidance_scale=3")
    assert result.returncode == 2 and "is an unconditional run" in result.stderr


# ---------------------------------------------------------------------------- every checkpoint a model
EVAL_TINY = ["metric.num_samples=4", "metric.num_real=8", "metric.batch_size=4"]


def test_an_option_of_the_runs_own_sampler_changes_only_that_option(finished_run, cache_dir, tmp_path):
    """``+sampler.scheduler.KEY=V`` without ``sampler=``: the run's own sampler (here the objective's
    ``dpmpp_sde``) with that option changed, for evaluate as for sample, and compare names it; an option
    the class does not have is one line."""
    from conftest import run_main

    result = json.loads(run_main("evaluate", f"run={finished_run}", "+sampler.scheduler.thresholding=false",
                                 *EVAL_TINY, f"cache_dir={cache_dir}", check=True).stdout.strip().splitlines()[-1])
    assert result["sampler"] == "dpmpp_sde" and result["sampler_options"]["thresholding"] is False
    assert result["sampler_options"]["algorithm_type"] == "sde-dpmsolver++"  # the rest as the run's own
    run_main("compare", str(finished_run), f"out={tmp_path / 'cmp'}", check=True)  # named, though the only setting
    rows = json.loads((tmp_path / "cmp" / "summary.json").read_text())["samplers"]["rows"]
    assert [row["sampler"] for row in rows] == ["dpmpp_sde thresholding=False"]
    out = tmp_path / "s.npz"
    run_main("sample", f"run={finished_run}", "n=2", "+sampler.scheduler.thresholding=false", f"out={out}", check=True)
    assert np.array_equal(np.load(out)["images"], sample_run(finished_run, n=2, sampler_cfg=OmegaConf.create(
        {"scheduler": {"thresholding": False}})).images)
    assert not np.array_equal(np.load(out)["images"], sample_run(finished_run, n=2).images)
    bad = run_main("sample", f"run={finished_run}", "+sampler.scheduler.threshold=false", f"out={out}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: sampler.scheduler.threshold: not an option of DPMSolverMultistepScheduler")


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in model.denoiser.state_dict().items()}


def test_every_complete_checkpoint_is_a_model(finished_run, tmp_path):
    from conftest import crashed_copy, run_main

    from diffexp.sampling.generate import load_run_model
    from diffexp.training.checkpoints import EMA_FILE

    # checkpoint=STEP is that checkpoint's EMA weights; the last checkpoint's are model/'s (the final EMA).
    early = load_run_model(finished_run, "cpu", 2)
    saved = torch.load(finished_run / "checkpoints" / "step_0000002" / EMA_FILE, weights_only=True)["weights"]
    assert early.checkpoint == early.step == 2 and weights(early).keys() == saved.keys()
    assert all(torch.equal(weights(early)[k], saved[k]) for k in saved)
    final, last = load_run_model(finished_run, "cpu"), load_run_model(finished_run, "cpu", "last")
    assert final.checkpoint is None and last.checkpoint == 4
    assert all(torch.equal(weights(final)[k], v) for k, v in weights(last).items())
    assert not all(torch.equal(weights(final)[k], v) for k, v in weights(early).items())

    # An interrupted run (no model/) samples its newest complete checkpoint, built from its config, and
    # says so; those are the images checkpoint=2 gives the finished run (built from its model/).
    stopped = crashed_copy(finished_run, tmp_path / "stopped", checkpoint=2, logged=2)
    out = tmp_path / "s.npz"
    result = run_main("sample", f"run={stopped}", "n=3", f"out={out}", check=True)
    assert "has no model/" in result.stdout and "newest complete checkpoint, step 2" in result.stdout  # its log
    assert np.array_equal(np.load(out)["images"], sample_run(finished_run, n=3, checkpoint=2).images)

    # checkpoint=best: by the run's primary quality metric, as training logged it (step 4 only here).
    assert load_run_model(finished_run, "cpu", "best").checkpoint == 4
    for bad, says in (("7", "checkpoint=7: "), ("soon", "checkpoint=soon: expected a checkpoint step, last or best")):
        result = run_main("sample", f"run={stopped}", f"checkpoint={bad}", f"out={out}")
        assert result.returncode == 2 and says in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_main("sample", f"run={stopped}", "checkpoint=best", f"out={out}")
    assert result.returncode == 2 and "checkpoint=best: no quality metric was computed" in result.stderr


def test_an_evaluation_sweep_keeps_every_setting_and_compare_names_the_best(finished_run, cache_dir):
    from conftest import run_main
    from wandb_files import find_runs

    from diffexp.records.tracking import EXIT_CODES
    from diffexp.sampling.generate import load_run_model

    run = finished_run
    before = {p for p in run.rglob("*") if ".evaluate" not in p.parts}
    run_main("evaluate", "-m", f"run={run}", "checkpoint=2,4", "seed=0,1", *EVAL_TINY, f"cache_dir={cache_dir}",
             check=True)
    results = json.loads((run / "eval.json").read_text())["results"]
    assert sorted((r["checkpoint"], r["seed"]) for r in results) == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert all(r["key"][0] == "checkpoint" and "seed" in r["key"] for r in results)
    # the same sampling seed gives every setting the same noise: one model, one seed, one number
    again = json.loads(run_main("evaluate", f"run={run}", "checkpoint=4", "seed=1", *EVAL_TINY,
                                f"cache_dir={cache_dir}", "wandb=true", check=True).stdout.strip().splitlines()[-1])
    assert again["eval/fd_digits_4"] == next(r["eval/fd_digits_4"] for r in results if (r["checkpoint"], r["seed"]) == (4, 1))
    assert len(json.loads((run / "eval.json").read_text())["results"]) == 4  # the same setting: replaced
    written = {p for p in run.rglob("*") if ".evaluate" not in p.parts} - before
    assert {p.name for p in written if p.parent == run} == {"eval.json", ".eval.lock"}  # no images
    assert all(p.is_relative_to(run / "wandb") for p in written if p.parent != run)

    # checkpoint=best by a metric evaluate computed: the step with the better mean over the seeds
    fd = {s: np.mean([r["eval/fd_digits_4"] for r in results if r["checkpoint"] == s]) for s in (2, 4)}
    best = load_run_model(run, "cpu", "best", metric_key="eval/fd_digits_4")
    assert best.checkpoint == min(fd, key=fd.get)

    # compare: quality against the checkpoint's step, and the best setting with its interval over seeds
    run_main("compare", str(run), f"out={run / 'cmp'}", check=True)
    summary = json.loads((run / "cmp" / "summary.json").read_text())
    [[point2, point4]] = summary["evaluation_curves"]["fields"]["checkpoint"].values()
    assert (point2["x"], point4["x"]) == (2, 4) and point2["mean"] == pytest.approx(fd[2]) and point2["n"] == 2
    [top] = summary["samplers"]["best_setting"]
    assert top["setting"] == {"checkpoint": min(fd, key=fd.get)} and top["n"] == 2 and top["eval/fd_digits_4"]["ci95"] > 0
    assert (run / "cmp" / "eval_vs_checkpoint.png").is_file()
    assert f"best evaluation setting: checkpoint={min(fd, key=fd.get)}" in (run / "cmp" / "report.md").read_text()

    # W&B: the results as a table and a chart against the step, the run closed as training left it
    *_, added = find_runs(run / "wandb")
    [row] = [h for h in added.history if "evaluations/results" in h]
    assert row["evaluations/results"]["nrows"] == 4 and "evaluations/fd_digits_4_vs_checkpoint_table" in row
    assert added.exit_code == EXIT_CODES["finished"]


def weakened_copy(run: Path, dest: Path) -> Path:
    """A copy of run ``run`` whose exported denoiser has its output layer halved: a compatible,
    weaker guide without training one."""
    from diffusers import UNet2DModel

    shutil.copytree(run, dest, symlinks=True)
    unet = UNet2DModel.from_pretrained(dest / "model" / "unet")
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.5)
    unet.save_pretrained(dest / "model" / "unet")
    return dest


def test_a_run_is_autoguided_by_another_run(finished_run, tmp_path):

    weak = weakened_copy(finished_run, tmp_path / "weak")
    plain = sample_run(finished_run, n=4, seed=0).images
    assert np.array_equal(sample_run(finished_run, n=4, seed=0, guide=str(weak), guidance_scale=1.0).images, plain)
    guided = sample_run(finished_run, n=4, seed=0, guide=str(weak), guidance_scale=2.0, guidance_interval=[0.0, 1.0])
    assert not np.array_equal(guided.images, plain)
    early = sample_run(finished_run, n=4, seed=0, guide_checkpoint=2, guidance_scale=1.0)
    assert np.array_equal(early.images, plain)


def test_a_guide_that_models_other_data_is_refused_in_one_line(finished_run, tmp_path, cache_dir):
    from conftest import run_main

    other = shutil.copytree(finished_run, tmp_path / "other", symlinks=True)
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("resolution: 8", "resolution: 16"))
    result = run_main("evaluate", f"run={finished_run}", f"guide={other}", "guidance_scale=2")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: guide={other}: its resolution is 16, the run's 8 (a guide must model the same data the same way)")
    for args, says in ((["guide=" + str(finished_run), "guidance_scale=2"], "cannot guide itself"),
                       (["guide=" + str(other)], "give the autoguidance weight too, guidance_scale=w"),
                       (["guidance_interval=[0.2,0.7]"], "nothing is guided on an unconditional run"),
                       (["guidance_interval=[0.7,0.2]"], "guidance_interval=[0.7, 0.2]: expected [lo,hi]")):
        result = run_main("sample", f"run={finished_run}", *args)
        assert result.returncode == 2 and says in result.stderr.strip().splitlines()[-1], result.stderr
    # evaluate keeps a guided result apart from the unguided one, keyed by its guide and interval
    weak = weakened_copy(finished_run, tmp_path / "weak")
    run_main("evaluate", f"run={finished_run}", f"guide={weak}", "guidance_scale=2", "guidance_interval=[0.5,1]",
             "metric.num_samples=4", "metric.num_real=8", "metric.batch_size=4", f"cache_dir={cache_dir}", check=True)
    (result,) = RunDir(finished_run).eval_results()
    assert (result["guide"], result["guide_checkpoint"], result["guidance_scale"], result["guidance_interval"]) == (
        str(weak), None, 2.0, [0.5, 1.0])
