"""Post-hoc EMA (diffexp.training.phema): the profile maths against numerical integrals, tracking
and reconstruction on a known weight trajectory, and a tiny run that resumes exactly and samples
any reconstructable width."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import crashed_copy, run_main, run_train
from omegaconf import OmegaConf
from safetensors.torch import load_file

from diffexp import DiffexpError
from diffexp.training import phema

PHEMA = ["trainer.ema.kind=phema", "trainer.ema.update_every=1", "trainer.ema.phema.snapshot_every=1",
         "trainer.ema.phema.dtype=float32", "trainer.max_steps=6", "trainer.eval_every=0"]


def test_width_and_exponent_are_inverse_and_match_the_profile_moments():
    for std in (0.01, 0.05, 0.1, 0.2, 0.28):
        gamma = phema.std_to_exp(std)
        assert math.isclose(phema.exp_to_std(gamma), std, rel_tol=1e-9)
        tau = np.linspace(0, 1, 200_001)  # the profile at t = 1: (gamma + 1) tau^gamma
        p = (gamma + 1) * tau ** gamma
        mean = np.trapezoid(tau * p, tau)
        assert math.isclose(math.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau)), std, rel_tol=1e-3)
    assert phema.power_beta(3.0, 4, 7) == pytest.approx(math.prod((1 - 1 / t) ** 4 for t in (5, 6, 7)))


def test_profile_inner_products_are_the_integrals():
    tau = np.linspace(0, 300, 600_001)
    for (ta, sa), (tb, sb) in [((100, 0.05), (300, 0.1)), ((300, 0.05), (120, 0.05)), ((200, 0.1), (200, 0.07))]:
        ga, gb = phema.std_to_exp(sa), phema.std_to_exp(sb)
        pa = np.where(tau <= ta, (ga + 1) * tau ** ga / ta ** (ga + 1), 0)
        pb = np.where(tau <= tb, (gb + 1) * tau ** gb / tb ** (gb + 1), 0)
        assert float(phema.profile_dot(ta, ga, tb, gb)) == pytest.approx(np.trapezoid(pa * pb, tau), rel=1e-3)


def track(trajectory, stds, folder, snapshot_every, update_every=3):
    """Track ``trajectory`` (step -> vector) with PowerEMA profiles ``stds``, snapshots in ``folder``
    every ``snapshot_every`` steps; returns the tracker."""
    net = torch.nn.Linear(trajectory.values.shape[1], 1, bias=False)
    tracker = phema.PowerEMA(net, OmegaConf.create({"phema": {"std": stds}}))
    steps = len(trajectory.values)
    for step in range(1, steps + 1):
        with torch.no_grad():
            net.weight.copy_(trajectory(step))
        if step % update_every == 0 or step % snapshot_every == 0:
            tracker.update(net, step)
        if folder is not None and step % snapshot_every == 0:
            tracker.save_snapshots(folder, torch.float32)
    return tracker


class Trajectory:
    """Known weights w_s = (sin(s / 40), s / 100, 1) for s = 1..steps."""

    def __init__(self, steps: int):
        s = np.arange(1, steps + 1)
        self.values = np.stack([np.sin(s / 40), s / 100, np.ones_like(s, dtype=float)], 1)

    def __call__(self, step: int) -> torch.Tensor:
        return torch.tensor(self.values[step - 1], dtype=torch.float32)[None]


def test_tracked_profile_is_the_closed_form_power_average():
    traj, std, steps = Trajectory(120), 0.1, 120
    tracker = track(traj, [std], None, snapshot_every=10)
    gamma = phema.std_to_exp(std)
    updates = [s for s in range(1, steps + 1) if s % 3 == 0 or s % 10 == 0]
    # each update's weights stand for the steps since the previous one: weight (u_k^(g+1) - u_(k-1)^(g+1)) / t^(g+1)
    expected = sum(((u ** (gamma + 1) - prev ** (gamma + 1)) / steps ** (gamma + 1)) * traj.values[u - 1]
                   for prev, u in zip([0, *updates], updates))
    assert np.allclose(tracker.models[0].weight.detach().numpy()[0], expected, rtol=1e-5)


def test_reconstruction_gives_the_tracked_profiles_and_a_linear_fit_of_another(tmp_path):
    traj, folder = Trajectory(400), tmp_path / "phema"
    track(traj, [0.05, 0.10], folder, snapshot_every=20)
    direct = track(traj, [0.07], None, snapshot_every=20)  # the width to reconstruct, tracked for reference
    for std, step in ((0.05, 400), (0.1, 400), (0.1, 200)):  # a tracked width at a snapshot step: that snapshot
        own = load_file(folder / phema.snapshot_name(std, step))["weight"]
        assert torch.allclose(phema.reconstruct(tmp_path, std, step)["weight"], own, rtol=1e-5, atol=1e-6)
    rebuilt = phema.reconstruct(tmp_path, 0.07)["weight"]
    # linear in the snapshots, with EDM2's least-squares coefficients
    found = phema.snapshots(folder)
    x, error = phema.solve_coefficients([m["t"] for _, m in found], [m["std"] for _, m in found], 400, 0.07)
    combined = sum(c * load_file(p)["weight"].double() for (p, _), c in zip(found, x))
    assert torch.allclose(rebuilt, combined.float(), atol=1e-6) and error < 0.01
    # and close to the profile tracked directly (the fit's error on a smooth trajectory)
    assert torch.allclose(rebuilt, direct.models[0].weight, atol=2e-3)
    assert (folder / "reconstructed" / "ema_std0.07-step0000400.safetensors").is_file()


def test_out_of_range_width_is_refused_in_one_line(tmp_path):
    track(Trajectory(100), [0.05, 0.10], tmp_path / "phema", snapshot_every=20)
    with pytest.raises(DiffexpError, match=r"^ema_std=0\.29: outside the range .* at step 100 \(0\.0\d\d to 0\.\d+;"):
        phema.reconstruct(tmp_path, 0.29)
    with pytest.raises(DiffexpError, match=r"^ema_std=0\.1: no post-hoc EMA snapshot at step 50 "):
        phema.reconstruct(tmp_path, 0.1, 50)


def test_phema_run_resumes_exactly_and_samples_a_reconstructed_width(train, tmp_path):
    from diffexp.sampling.generate import sample_run

    full, _ = train(*PHEMA, name="full")
    crashed = crashed_copy(full, tmp_path / "crashed", checkpoint=4, logged=5)
    run_train(f"resume={crashed}")  # snapshots 5 and 6 were written by the "crashed" session: dropped, written again
    for name in sorted(p.name for p in (full / "phema").glob("*.safetensors")):
        a, b = load_file(full / "phema" / name), load_file(crashed / "phema" / name)
        assert all(torch.equal(v, b[k]) for k, v in a.items()), name
    assert len(list((full / "phema").glob("*.safetensors"))) == 12  # two widths x six steps
    exported = load_file(full / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    widest = load_file(full / "phema" / "std0.100-step0000006.safetensors")
    assert all(torch.equal(v, exported[k]) for k, v in widest.items())  # model/ is the widest profile

    first = sample_run(full, n=4, ema_std=0.07, device="cpu")
    cache = full / "phema" / "reconstructed" / "ema_std0.07-step0000006.safetensors"
    stamp = cache.stat().st_mtime_ns
    again = sample_run(full, n=4, ema_std=0.07, device="cpu")
    assert cache.stat().st_mtime_ns == stamp and np.array_equal(first.images, again.images)
    assert not np.array_equal(first.images, sample_run(full, n=4, device="cpu").images)
    refused = run_main("sample", f"run={full}", "n=2", "ema_std=0.25")
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1].startswith(
        f"error: ema_std=0.25: outside the range the snapshots of {full} reconstruct at step 6 (")
