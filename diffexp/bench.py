"""``python -m diffexp.bench [overrides]``: where the time of training and sampling goes.

Measures, after warm-up, on the composed training config (same groups and overrides as train):

- training images/s of OUR loop (the real ``diffexp.training.loop.train`` into a temporary run directory)
  against a plain PyTorch loop of the tutorial kind on the same model and batch (add noise,
  predict, MSE, backward, clip, AdamW step), in alternating repeats (the order flips each repeat),
  and their ratio with spread;
- a per-step breakdown of our loop (data, forward_backward, optimizer, ema, logging) from the
  loop's own ``record_function`` phases under ``torch.profiler``;
- the input pipeline alone (``Batches.get``), sampling images/s per sampler and step count,
  evaluation cost, peak memory, model FLOPs per image and the achieved FLOP/s, against the card's
  datasheet bf16 peak and against the machine's own measured matrix-product rate (fp32, and bf16
  where the device has it natively).

Writes JSON (``bench.out``) and prints a short table. Examples::

    python -m diffexp.bench                                   # unet_small on digits, CPU
    python -m diffexp.bench model=unet_base dataset=cifar10 dataset.resolution=32 trainer.batch_size=128 \\
        trainer.mixed_precision=bf16 trainer.tf32=true
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from diffexp import DiffexpError
from diffexp.config import CONFIG_PATH, report_errors

PHASES = ("data", "forward_backward", "optimizer", "ema", "logging")
# Dense bf16 peak of cards we know (TFLOP/s, vendor datasheets, SXM parts), for "fraction of peak".
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}


def sync(device) -> None:
    """Wait for queued device work, so wall-clock time covers it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device) -> dict:
    """The machine: CPU model and threads, GPU name, library versions."""
    import diffusers
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": str(device), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "gpu": None, "load_average": list(os.getloadavg())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bench_train_config(cfg: DictConfig, steps: int) -> DictConfig:
    """The training config of a timed run: two log intervals of ``steps`` (the first warms up), no
    tracker, no in-training metric, and a one-image one-step grid at the end (off the timed path)."""
    train_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # the loop resolves as in train
    with open_dict(train_cfg):
        train_cfg.pop("bench", None)
        train_cfg.logger = OmegaConf.load(Path(CONFIG_PATH) / "logger" / "none.yaml")
        train_cfg.metric = OmegaConf.load(Path(CONFIG_PATH) / "metric" / "none.yaml")
        t = train_cfg.trainer
        t.max_steps, t.log_every = 2 * steps, steps
        t.sample_every = t.eval_every = t.checkpoint_every = 0
        t.grid_size, t.keep_checkpoints = 1, 1
        t.warmup_steps = min(t.warmup_steps, steps)
        train_cfg.sampler.steps = 1
    return train_cfg


def time_ours(cfg: DictConfig, steps: int) -> float:
    """Images/s of ``diffexp.training.loop.train`` over ``steps`` steps after as many warm-up steps, as the
    loop itself measures it (the interval ends in the loop's one host-device sync)."""
    from diffexp.records.rundir import RunDir
    from diffexp.training.loop import train

    with tempfile.TemporaryDirectory(prefix="diffexp-bench-") as tmp:
        train(bench_train_config(cfg, steps), tmp)
        rows = [r for r in RunDir(tmp).metrics() if r.get("step") == 2 * steps and "train/img_per_s" in r]
        if not rows:
            raise DiffexpError(f"bench: the training run logged no throughput at step {2 * steps}")
        return float(rows[-1]["train/img_per_s"])


def profile_ours(cfg: DictConfig, steps: int, device) -> tuple[dict, float | None]:
    """Milliseconds per step of each named phase of our loop, from ``torch.profiler`` over the
    ``steps`` steps that follow as many warm-up steps. On CUDA, ``cpu_ms`` is launch time and
    ``device_ms`` the GPU time of the phase; on a CPU they coincide and ``device_ms`` is absent.
    Also returns the host-device synchronisations per step (``syncs_per_step``)."""
    from torch.profiler import profile

    from diffexp.training.loop import train

    with tempfile.TemporaryDirectory(prefix="diffexp-bench-") as tmp, profile(activities=activities(device)) as prof:
        train(bench_train_config(cfg, steps), tmp)
    grad_accum = cfg.trainer.grad_accum
    # Per micro-batch phases ran grad_accum times a step, ema once a step, logging (maintenance) once
    # per log interval: leave out the warm-up interval's events of each.
    skip = {name: steps * grad_accum if name in ("data", "forward_backward", "optimizer") else steps for name in PHASES}
    skip["logging"] = 1
    return phase_ms(prof.events(), steps, skip), syncs_per_step(prof.events(), steps, grad_accum)


def profile_plain(plain: "PlainLoop", steps: int) -> dict:
    """Milliseconds per step of the plain loop's phases (``data``, ``forward_backward``,
    ``optimizer``, named as in ours) over ``steps`` profiled steps after as many unprofiled ones."""
    from torch.profiler import profile

    for _ in range(steps):
        plain.step()
    sync(plain.device)
    with profile(activities=activities(plain.device)) as prof:
        for _ in range(steps):
            plain.step()
        sync(plain.device)
    return phase_ms(prof.events(), steps, {})


def activities(device) -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def phase_ms(events, steps: int, skip: dict[str, int]) -> dict:
    """Per-step milliseconds of each phase in ``events``, leaving out the first ``skip[name]`` events
    of each (warm-up): ``cpu_ms`` (host time) and, on CUDA, ``device_ms`` (GPU time)."""
    from torch.autograd import DeviceType

    out = {}
    for name in PHASES:
        n = skip.get(name, 0)
        cpu = sorted((e for e in events if e.name == name and e.device_type == DeviceType.CPU),
                     key=lambda e: e.time_range.start)[n:]
        if not cpu:
            continue
        row = {"cpu_ms": sum(e.time_range.elapsed_us() for e in cpu) / 1e3 / steps}
        gpu = sorted((e for e in events if e.name == name and e.device_type == DeviceType.CUDA),
                     key=lambda e: e.time_range.start)[n:]
        if gpu:
            row["device_ms"] = sum(e.time_range.elapsed_us() for e in gpu) / 1e3 / steps
        out[name] = row
    return out


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def syncs_per_step(events, steps: int, grad_accum: int) -> float | None:
    """Host-device synchronisations per step over the measured steps (from the first measured
    ``data`` phase to the end of the last ``logging`` phase); None where the profile has no CUDA
    runtime calls (a CPU). Our loop should show about 1/steps: the read at the log step."""
    data = sorted((e.time_range.start for e in events if e.name == "data"))
    logging = sorted((e.time_range.end for e in events if e.name == "logging"))
    runtime = [e for e in events if e.name.startswith("cuda")]
    if not runtime or len(data) <= steps * grad_accum or not logging:
        return None
    start, end = data[steps * grad_accum], logging[-1]
    return sum(1 for e in runtime if e.name in SYNC_CALLS and start <= e.time_range.start <= end) / steps


class PlainLoop:
    """The baseline: the tutorial's loop, written as a researcher would by hand."""

    def __init__(self, cfg: DictConfig, images_u8, device):
        import torch

        from diffexp.models.build import build_model, build_noise_scheduler

        torch.manual_seed(cfg.seed)
        self.device = device
        self.model = build_model(cfg.model).to(device).train()
        self.noise_scheduler = build_noise_scheduler(cfg.scheduler)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.trainer.lr)
        self.images = images_u8.to(device)
        self.batch_size = cfg.trainer.batch_size
        self.max_norm = cfg.trainer.max_grad_norm or float("inf")

    def step(self) -> None:
        import torch
        import torch.nn.functional as F
        from torch.profiler import record_function as phase

        from diffexp.data.datasets import to_float
        from diffexp.sampling.pipeline import call_denoiser

        # The phases are named as in ours, for the side-by-side breakdown (free without a profiler).
        with phase("data"):
            idx = torch.randint(0, len(self.images), (self.batch_size,), device=self.device)
            clean = to_float(self.images[idx])
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (self.batch_size,),
                                      device=self.device)
            noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        with phase("forward_backward"):
            noise_pred = call_denoiser(self.model, noisy, timesteps, None)  # a DiT gets its one constant label
            loss = F.mse_loss(noise_pred, noise)
            loss.backward()
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def images_per_s(self, steps: int) -> float:
        """Images/s over ``steps`` steps after as many warm-up steps, with PyTorch's default matmul
        precision (our loop may have switched TF32 on for the whole process)."""
        import torch

        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            for _ in range(steps):
                self.step()
            sync(self.device)
            start = time.perf_counter()
            for _ in range(steps):
                self.step()
            sync(self.device)
            return steps * self.batch_size / (time.perf_counter() - start)
        finally:
            torch.set_float32_matmul_precision(precision)


def time_input_pipeline(cfg: DictConfig, images_u8, device, n: int) -> float:
    """Images/s of ``Batches.get`` alone (data already on the device), after one warm-up epoch load."""
    from diffexp.data.datasets import Batches

    t = cfg.trainer
    batches = Batches(images_u8, batch_size=t.batch_size, grad_accum=t.grad_accum, num_processes=1, process_index=0,
                      seed=cfg.seed, random_flip=cfg.dataset.random_flip, device=device)
    batches.get(0)
    sync(device)
    start = time.perf_counter()
    for step in range(n):
        for micro in range(t.grad_accum):
            batches.get(step, micro)
    sync(device)
    return n * t.batch_size / (time.perf_counter() - start)


def time_sampling(cfg: DictConfig, unet, device) -> list[dict]:
    """Images/s of ``diffexp.sampling.generate`` for each sampler and step count of ``bench``."""
    from diffexp.models.build import build_sampler, sampler_config
    from diffexp.sampling.generate import generate

    rows = []
    n = cfg.bench.sample_n
    for name in cfg.bench.samplers:
        sampler = build_sampler(sampler_config(name), cfg.scheduler)
        generate(unet, sampler, n=min(n, 2), steps=2, seed=0)  # warm-up
        for steps in cfg.bench.sampler_steps:
            sync(device)
            start = time.perf_counter()
            generate(unet, sampler, n=n, steps=steps, seed=0)
            sync(device)
            seconds = time.perf_counter() - start
            rows.append({"sampler": name, "steps": steps, "images": n, "seconds": seconds, "img_per_s": n / seconds})
    return rows


def time_evaluation(cfg: DictConfig, unet, images_u8) -> dict:
    """Seconds of one evaluation of ``cfg.metric`` on ``bench.eval_samples`` samples, or why it was not measured."""
    from accelerate import Accelerator

    from diffexp.models.build import build_sampler
    from diffexp.quality.evaluator import Evaluator, WeightsMissing, resolve_metric

    if cfg.metric.name == "none":
        return {"measured": False, "note": "metric=none: no evaluation; its cost is sampling (above) plus the metric"}
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.metric = resolve_metric(cfg.metric, cfg.dataset)
        cfg.metric.num_samples = int(cfg.bench.eval_samples)
    try:
        evaluator = Evaluator(cfg.metric, Accelerator(), images_u8, cfg.dataset, cfg.cache_dir)
    except WeightsMissing as e:
        return {"measured": False, "note": f"{e}"}
    sampler = build_sampler(cfg.sampler, cfg.scheduler)
    start = time.perf_counter()
    results = evaluator(unet, sampler, cfg.sampler.steps)
    seconds = time.perf_counter() - start
    return {"measured": True, "metric": cfg.metric.name, "num_samples": int(cfg.bench.eval_samples),
            "seconds": seconds, "seconds_per_1k_samples": 1000 * seconds / int(cfg.bench.eval_samples),
            "results": results}


def model_flops(unet, batch, timesteps) -> dict:
    """FLOPs per image of one training step (forward + backward) and of one forward pass."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffexp.sampling.pipeline import call_denoiser

    with FlopCounterMode(display=False) as counter:
        call_denoiser(unet, batch, timesteps, None).float().pow(2).mean().backward()
    train = counter.get_total_flops()
    unet.zero_grad(set_to_none=True)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_denoiser(unet, batch, timesteps, None)
    return {"train_per_image": train / len(batch), "forward_per_image": counter.get_total_flops() / len(batch)}


def has_native_bf16(device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware: any CUDA card we run on, a CPU with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def matmul_rate(device, dtype, n: int, repeats: int = 3) -> float:
    """FLOP/s of an ``n`` x ``n`` matrix product on ``device`` in ``dtype`` (2 n^3 FLOPs), the best of
    ``repeats`` after a warm-up, with every thread: what the machine's arithmetic can do, to hold the
    training rate against (``torch.mm`` 2048^2 on a CPU, 8192^2 on a GPU)."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_memory_mib(device) -> float:
    """Peak memory so far: GPU memory allocated by PyTorch on CUDA, else the process's peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def spread(values: list[float]) -> dict:
    """Median, min, max, mean, sample standard deviation and the 95% t-interval half-width of the
    mean (``ci95``, None from one value) of repeated measurements."""
    from diffexp.report.stats import mean_ci

    mean, ci95 = mean_ci(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": mean, "std": statistics.stdev(values) if len(values) > 1 else 0.0, "ci95": ci95,
            "values": values}


def run_bench(cfg: DictConfig) -> dict:
    """Every measurement of the module docstring, as one JSON-ready dict."""
    import torch
    from accelerate import PartialState

    from diffexp.data.datasets import load_images
    from diffexp.models.build import build_model, fused_adamw

    b = cfg.bench
    for key in ("steps", "repeats", "profile_steps", "data_batches", "sample_n"):
        if not isinstance(b[key], int) or b[key] < 1:
            raise DiffexpError(f"bench.{key}={b[key]}: expected a positive integer")
    # PartialState, not an Accelerator: accelerate keeps the first Accelerator's settings for the
    # whole process, and the training runs below must make theirs (trainer.compile, precision).
    device = PartialState().device
    images = load_images(cfg.dataset, cfg.cache_dir)

    # Ours and the plain loop alternate, and which goes first alternates too (ours, plain, plain,
    # ours, ...), so drifting load on the machine and any first-or-second effect hit both alike.
    ours, plain, peaks = [], [], {}
    for repeat in range(b.repeats):
        for which in ("ours", "plain") if repeat % 2 == 0 else ("plain", "ours"):
            if which == "ours":
                ours.append(time_ours(cfg, b.steps))
            else:
                plain.append(PlainLoop(cfg, images, device).images_per_s(b.steps))
            peaks[f"train_{which}"] = max(peaks.get(f"train_{which}", 0.0), peak_memory_mib(device))
    ratios = [o / p for o, p in zip(ours, plain)]
    phases, syncs = profile_ours(cfg, b.profile_steps, device)
    plain_phases = profile_plain(PlainLoop(cfg, images, device), b.profile_steps)

    data_rate = time_input_pipeline(cfg, images, device, b.data_batches)
    unet = build_model(cfg.model).to(device).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampling = time_sampling(cfg, unet, device)
    peaks["sampling"] = peak_memory_mib(device)
    evaluation = time_evaluation(cfg, unet, images)

    n = min(cfg.trainer.batch_size, 8)  # FLOPs are linear in the batch: a small one counts them
    shape = (n, cfg.dataset.channels, cfg.dataset.resolution, cfg.dataset.resolution)
    flops = model_flops(build_model(cfg.model).to(device).train(), torch.randn(shape, device=device),
                        torch.randint(0, 1000, (n,), device=device))
    ours_median = statistics.median(ours)
    flops["achieved_flop_per_s"] = flops["train_per_image"] * ours_median
    info = device_info(device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if info["gpu"] and k in info["gpu"]), None)
    flops["peak_bf16_flop_per_s"] = peak * 1e12 if peak else None
    flops["fraction_of_peak"] = flops["achieved_flop_per_s"] / (peak * 1e12) if peak else None
    # The machine's own measured rates (issue 31's yardstick): fp32, and bf16 where it is native.
    n = 8192 if device.type == "cuda" else 2048
    rates = {"fp32": matmul_rate(device, torch.float32, n)}
    if has_native_bf16(device):
        rates["bf16"] = matmul_rate(device, torch.bfloat16, n)
    for name in ("fp32", "bf16"):
        rate = rates.get(name)
        flops[f"matmul_{name}_flop_per_s"] = rate
        flops[f"fraction_of_matmul_{name}"] = flops["achieved_flop_per_s"] / rate if rate else None
    flops["matmul_size"] = n

    from diffusers.models.attention_processor import Attention

    attention = sorted({type(m.processor).__name__ for m in unet.modules() if isinstance(m, Attention)})
    step_ms = 1e3 * cfg.trainer.batch_size / ours_median
    trainer = OmegaConf.create(OmegaConf.to_container(cfg.trainer))
    trainer.fused_adamw = fused_adamw(trainer, device)  # as the loop resolves it (auto)
    return {
        "device": info,
        "config": {"model": HydraConfig.get().runtime.choices.get("model"), "dataset": cfg.dataset.name,
                   "resolution": cfg.dataset.resolution, "batch_size": cfg.trainer.batch_size,
                   "grad_accum": cfg.trainer.grad_accum, "mixed_precision": cfg.trainer.mixed_precision,
                   **{k: trainer.get(k) for k in ("fused_adamw", "tf32", "channels_last", "compile")},
                   "attention_processors": attention,
                   "num_parameters": sum(p.numel() for p in unet.parameters()),
                   "bench": OmegaConf.to_container(b, resolve=True)},
        "train": {"ours_img_per_s": spread(ours), "plain_img_per_s": spread(plain), "ratio": spread(ratios),
                  "ours_ms_per_step": step_ms, "host_device_syncs_per_step": syncs},
        "breakdown_ms_per_step": phases,
        "plain_breakdown_ms_per_step": plain_phases,
        "input_pipeline": {"img_per_s": data_rate, "times_training_rate": data_rate / ours_median},
        "sampling": sampling,
        "evaluation": evaluation,
        "peak_memory_mib": peaks,
        "flops": flops,
    }


def table(result: dict) -> str:
    """A short human-readable summary of ``run_bench``'s result."""
    d, t, c = result["device"], result["train"], result["config"]
    lines = [f"device  {d['gpu'] or d['cpu']} ({d['torch_threads']} threads), torch {d['torch']}",
             f"model   {c['model']} ({c['num_parameters'] / 1e6:.2f}M params) on {c['dataset']} "
             f"{c['resolution']}px, batch {c['batch_size']}, precision {c['mixed_precision']}",
             f"train   ours {t['ours_img_per_s']['median']:.1f} img/s  plain {t['plain_img_per_s']['median']:.1f} img/s  "
             f"ratio {t['ratio']['median']:.2f} (min {t['ratio']['min']:.2f}, max {t['ratio']['max']:.2f}, "
             f"mean {t['ratio']['mean']:.3f}" + (f" ± {t['ratio']['ci95']:.3f}" if t['ratio']['ci95'] is not None
                                                  else "") + f", n={len(t['ratio']['values'])})"]
    if t["host_device_syncs_per_step"] is not None:
        lines.append(f"  host-device syncs {t['host_device_syncs_per_step']:.2f} per step")
    plain = result["plain_breakdown_ms_per_step"]
    lines.append(f"  {'ms/step':<17}{'ours':>9}{'plain':>9}")

    def ms(row, key="cpu_ms"):
        return f"{row[key]:9.2f}" if row and key in row else f"{'-':>9}"

    for name, row in result["breakdown_ms_per_step"].items():
        on_device = f"   device {ms(row, 'device_ms')}{ms(plain.get(name), 'device_ms')}" if "device_ms" in row else ""
        lines.append(f"  {name:<17}{ms(row)}{ms(plain.get(name))}{on_device}")
    p = result["input_pipeline"]
    lines.append(f"data    {p['img_per_s']:.0f} img/s = {p['times_training_rate']:.0f}x what training consumes")
    for row in result["sampling"]:
        lines.append(f"sample  {row['sampler']:<6} {row['steps']:>4} steps  {row['img_per_s']:.1f} img/s")
    e = result["evaluation"]
    lines.append(f"eval    {e['seconds']:.1f} s" if e["measured"] else f"eval    not measured: {e['note']}")
    f = result["flops"]
    frac = f" = {100 * f['fraction_of_peak']:.1f}% of bf16 peak" if f["fraction_of_peak"] else ""
    for name in ("fp32", "bf16"):
        if f.get(f"fraction_of_matmul_{name}"):
            frac += (f", {100 * f[f'fraction_of_matmul_{name}']:.0f}% of this machine's {name} matmul "
                     f"({f[f'matmul_{name}_flop_per_s'] / 1e12:.3f} TFLOP/s at {f['matmul_size']}^2)")
    lines.append(f"flops   {f['train_per_image'] / 1e9:.3f} GFLOP/img/step, achieved {f['achieved_flop_per_s'] / 1e12:.4f} "
                 f"TFLOP/s{frac}")
    lines.append("memory  " + ", ".join(f"{k} {v:.0f} MiB" for k, v in result["peak_memory_mib"].items()))
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="bench")
def main(cfg: DictConfig) -> None:
    with report_errors():
        result = run_bench(cfg)
        out = Path(cfg.bench.out or Path(HydraConfig.get().runtime.output_dir) / "bench.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(table(result))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
