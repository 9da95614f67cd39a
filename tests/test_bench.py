"""The benchmark runs as a user would run it and writes a well-formed report (not a speed test)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import REPO, TINY, crashed_copy, run_main

QUICK = ["bench.steps=2", "bench.repeats=2", "bench.profile_steps=2", "bench.data_batches=3",
         "bench.samplers=[ddim,dpmpp]", "bench.sampler_steps=[2]", "bench.sample_n=2"]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_writes_a_complete_report(tmp_path, cache_dir):
    out = tmp_path / "report" / "bench.json"
    proc = run_main("bench", *TINY, *QUICK, "metric=none", f"bench.out={out}", f"hydra.run.dir={tmp_path / 'hydra'}",
                   f"cache_dir={cache_dir}", check=True)
    assert f"wrote {out}" in proc.stdout
    assert "ratio" in proc.stdout and "ms/step" in proc.stdout  # the table
    result = json.loads(out.read_text())

    assert result["device"]["device"] == "cpu" and result["device"]["torch"] and result["device"]["cpu"]
    assert positive(result["device"]["torch_threads"])
    assert result["config"]["model"] == "unet_tiny" and result["config"]["batch_size"] == 8
    assert result["config"]["fused_adamw"] is True  # trainer.fused_adamw: auto is fused on a CPU
    assert result["config"]["attention_processors"] == [] or all(result["config"]["attention_processors"])

    train = result["train"]
    for key in ("ours_img_per_s", "plain_img_per_s", "ratio"):
        assert len(train[key]["values"]) == 2 and all(positive(v) for v in train[key]["values"])
        assert train[key]["min"] <= train[key]["median"] <= train[key]["max"]
        assert train[key]["ci95"] >= 0  # half-width of the 95% t-interval of the mean
    assert train["host_device_syncs_per_step"] is None  # counted from CUDA runtime calls only
    assert math.isclose(train["ratio"]["values"][0],
                        train["ours_img_per_s"]["values"][0] / train["plain_img_per_s"]["values"][0])

    # every phase the loop names was seen by the profiler, after warm-up
    assert set(result["breakdown_ms_per_step"]) == {"data", "forward_backward", "optimizer", "ema", "logging"}
    assert all(positive(row["cpu_ms"]) for row in result["breakdown_ms_per_step"].values())
    # the plain loop, profiled the same way, has the phases it does (no EMA, no logging)
    assert set(result["plain_breakdown_ms_per_step"]) == {"data", "forward_backward", "optimizer"}
    assert all(positive(row["cpu_ms"]) for row in result["plain_breakdown_ms_per_step"].values())

    assert positive(result["input_pipeline"]["img_per_s"]) and positive(result["input_pipeline"]["times_training_rate"])
    assert [(r["sampler"], r["steps"]) for r in result["sampling"]] == [("ddim", 2), ("dpmpp", 2)]
    assert all(positive(r["img_per_s"]) for r in result["sampling"])
    assert result["evaluation"]["measured"] is False and "metric=none" in result["evaluation"]["note"]
    assert all(positive(v) for v in result["peak_memory_mib"].values())
    flops = result["flops"]
    assert positive(flops["train_per_image"]) and positive(flops["forward_per_image"])
    assert flops["train_per_image"] > 2 * flops["forward_per_image"]  # backward costs about twice the forward
    assert math.isclose(flops["achieved_flop_per_s"], flops["train_per_image"] * train["ours_img_per_s"]["median"])
    assert flops["fraction_of_peak"] is None  # no known peak for a CPU
    assert positive(flops["matmul_fp32_flop_per_s"]) and flops["matmul_size"] == 2048
    assert math.isclose(flops["fraction_of_matmul_fp32"], flops["achieved_flop_per_s"] / flops["matmul_fp32_flop_per_s"])
    assert (flops["matmul_bf16_flop_per_s"] is None) == (flops["fraction_of_matmul_bf16"] is None)


def test_bench_times_an_evaluation_when_the_inception_weights_are_there(tmp_path, inception_file):
    out = tmp_path / "bench.json"
    # its own cache: reference statistics cached here would be cache hits in the metric tests
    run_main("bench", *TINY, *QUICK, "bench.repeats=1", "bench.samplers=[]", "metric=fid_is_kid",
            f"metric.weights={inception_file}", "metric.num_real=8", "metric.batch_size=4", "bench.eval_samples=4",
            f"bench.out={out}", f"hydra.run.dir={tmp_path / 'hydra'}", f"cache_dir={tmp_path / 'cache'}", check=True)
    evaluation = json.loads(out.read_text())["evaluation"]
    assert evaluation["measured"] is True and evaluation["metric"] == "fid_is_kid" and evaluation["num_samples"] == 4
    assert positive(evaluation["seconds"])
    assert math.isclose(evaluation["seconds_per_1k_samples"], 1000 * evaluation["seconds"] / 4)
    assert {"eval/fid_4", "eval/is_4", "eval/kid_4"} <= set(evaluation["results"])


def test_bench_refuses_a_bad_setting(tmp_path, cache_dir):
    proc = run_main("bench", *TINY, "bench.steps=0", f"bench.out={tmp_path / 'b.json'}",
                   f"hydra.run.dir={tmp_path / 'hydra'}", f"cache_dir={cache_dir}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: bench.steps=0: expected a positive integer"
    assert not (tmp_path / "b.json").exists()


@pytest.mark.gpu
def test_speed_options_train(train):
    """bf16 autocast, fused AdamW, channels-last and TF32 (a no-op off CUDA) train, sample and evaluate,
    on a CPU as on a GPU."""
    run_dir, _ = train("trainer.mixed_precision=bf16", "trainer.fused_adamw=true", "trainer.channels_last=true",
                       "trainer.tf32=true", "trainer.eval_every=4")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses)
    assert (run_dir / "model" / "unet" / "config.json").is_file()
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png"))  # the fixed-noise grids
    [evaluation] = [r for r in rows if "eval/fd_digits_50" in r]
    assert evaluation["step"] == 4 and math.isfinite(evaluation["eval/fd_digits_50"])


def test_attention_is_pytorch_sdpa():
    """The models with attention use diffusers' default processor, which calls F.scaled_dot_product_attention."""
    from diffusers.models.attention_processor import Attention
    from hydra import compose, initialize_config_dir

    from diffexp.config import CONFIG_PATH
    from diffexp.models.build import build_model

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(config_name="bench", overrides=["model=unet_small"])
    unet = build_model(cfg.model)
    assert {type(m.processor).__name__ for m in unet.modules() if isinstance(m, Attention)} == {"AttnProcessor2_0"}


@pytest.mark.gpu
def test_compiled_run_resumes_exactly(train, tmp_path):
    """``trainer.compile`` (torch.compile through accelerate) trains, checkpoints the uncompiled
    weights and resumes bit-identically. Dynamo and AOTAutograd wrap and trace the model as they do
    for inductor; the ``aot_eager`` backend skips inductor's code generation, which alone takes a
    minute on a 2-core CPU (the wrapper, the saved keys and the resume are the same)."""
    import torch
    from safetensors.torch import load_file

    common = ["trainer.compile=true", "trainer.compile_backend=aot_eager", "trainer.max_steps=6",
              "trainer.sample_every=0", "trainer.keep_checkpoints=10"]
    full, _ = train(*common, name="full")
    crashed = crashed_copy(full, tmp_path / "crashed", checkpoint=4, logged=5)  # died after step 5
    run_main("train", f"resume={crashed}", check=True)

    def losses(run):
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [r["train/loss"] for r in rows if "train/loss" in r]

    assert len(losses(full)) == 6 and losses(crashed) == losses(full)
    checkpoint = load_file(full / "checkpoints" / "step_0000004" / "model.safetensors")
    assert not any("_orig_mod" in k for k in checkpoint)  # plain UNet2DModel keys, loadable without compile
    exported = load_file(full / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    again = load_file(crashed / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, again[k]) for k, v in exported.items())


def test_unknown_compile_mode_is_named(train):
    _, proc = train("trainer.compile=true", "trainer.compile_mode=fastest", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: trainer.compile_mode=fastest: expected one of null, default")


def test_the_gpu_check_plan_composes_and_its_plain_loop_runs_a_dit():
    """Every command of ``scripts/gpu_check.py`` (both sizes) composes, so device minutes are not spent
    on a misspelt override; the plain loop it compares against steps a DiT too."""
    import importlib.util

    import torch
    from hydra import compose, initialize_config_dir

    from diffexp.bench import PlainLoop
    from diffexp.config import CONFIG_PATH
    from diffexp.data.datasets import load_images

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # its dataclass looks its module up there
    spec.loader.exec_module(gpu_check)
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        for size in ("full", "tiny"):
            steps = gpu_check.plan(size)
            assert [s.kind for s in steps[:2]] == ["tests", "bench"] and any(s.kind == "train" for s in steps)
            for step in steps:
                if step.kind != "tests":
                    compose(config_name="bench" if step.kind == "bench" else "train", overrides=step.args)
        names = [s.name for s in gpu_check.plan("full")]
        assert {"unet_base-b128-cudagraphs", "unet_base-b512-default", "dit_b2-b128-compile"} <= set(names)
        cfg = compose(config_name="bench", overrides=["debug=tiny", "model=dit_xs2", "model.num_layers=1"])
    loop = PlainLoop(cfg, load_images(cfg.dataset, cfg.cache_dir), torch.device("cpu"))
    before = [p.detach().clone() for p in loop.model.parameters()]
    loop.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, loop.model.parameters()))
