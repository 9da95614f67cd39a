"""Datasets: real 🤗 datasets code on data made here (image folders, save_to_disk folders, parquet
repositories), preprocessed once, cached, and drawn as augmented batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO, cli_env, run_cli, run_main
from hydra import compose, initialize_config_dir
from PIL import Image

from diffexp import DiffexpError
from diffexp.config import CONFIG_PATH
from diffexp.data.datasets import Batches, cache_path, load_images


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets library's own Arrow cache inside the test's directory."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def dataset_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides)).dataset


def half_bright(width: int, height: int, shade: int) -> Image.Image:
    """An RGB image whose left half is bright and right half dark: a flip is visible."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = 200 + shade
    array[:, width // 2 :] = 10 + shade
    return Image.fromarray(array)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """24 images of mixed sizes and formats, some in a subfolder, as a user would have them."""
    folder = tmp_path / "my_images"
    (folder / "more").mkdir(parents=True)
    for i in range(24):
        image = half_bright(40 + 4 * (i % 3), 36 + 2 * (i % 5), shade=i)
        target = folder / "more" if i % 4 == 0 else folder
        image.save(target / f"img_{i:02d}.{'jpg' if i % 3 == 0 else 'png'}")
    return folder


def as_dataset(n: int = 20, column: str = "image") -> datasets.Dataset:
    images = [half_bright(48, 40, shade=i) for i in range(n)]
    features = datasets.Features({column: datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({column: images, "label": list(range(n))}, features=features)


def left_brighter(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x[..., :half].mean(dim=(1, 2, 3)) > x[..., half:].mean(dim=(1, 2, 3))


def batches(images, seed=0, random_flip=True, crop_to=None, batch_size=8):
    return Batches(images, batch_size=batch_size, grad_accum=1, num_processes=1, process_index=0, seed=seed,
                   random_flip=random_flip, device=torch.device("cpu"), crop_to=crop_to)


def test_image_folder_becomes_a_uint8_tensor_at_the_configured_resolution(image_folder, tmp_path):
    cfg = dataset_cfg("dataset=imagefolder", f"dataset.path={image_folder}", "dataset.resolution=16")
    images = load_images(cfg, tmp_path / "cache")
    assert images.dtype == torch.uint8 and images.shape == (24, 3, 16, 16)  # subfolder images included
    assert bool(left_brighter(images.float()).all())  # resize and center crop keep the layout
    x = batches(images).get(0)
    assert x.dtype == torch.float32 and x.shape == (8, 3, 16, 16)
    assert -1.0 <= x.min() < -0.8 and 0.6 < x.max() <= 1.0


def test_second_load_reads_the_cache_and_new_images_invalidate_it(image_folder, tmp_path):
    cfg = dataset_cfg("dataset=imagefolder", f"dataset.path={image_folder}", "dataset.resolution=16")
    first = load_images(cfg, tmp_path / "cache")
    cached = cache_path(cfg, tmp_path / "cache")
    stamp = cached.stat().st_mtime_ns
    again = load_images(cfg, tmp_path / "cache")
    assert torch.equal(first, again) and cached.stat().st_mtime_ns == stamp
    half_bright(40, 40, shade=30).save(image_folder / "new.png")
    assert len(load_images(cfg, tmp_path / "cache")) == 25
    assert len(list((tmp_path / "cache" / "datasets").glob("imagefolder-*.pt"))) == 2


def test_save_to_disk_folder_loads_as_hf_dataset_and_cache_hit_needs_no_source(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": as_dataset(20, column="img"), "test": as_dataset(4, column="img")}).save_to_disk(saved)
    cfg = dataset_cfg("dataset=hf", f"dataset.repo={saved}", "dataset.image_column=img", "dataset.split=test",
                      "dataset.resolution=8")
    first = load_images(cfg, tmp_path / "cache")
    assert first.shape == (4, 3, 8, 8)
    for f in sorted(saved.rglob("*"), reverse=True):  # the source is gone: only the cache can answer
        f.unlink() if f.is_file() else f.rmdir()
    saved.rmdir()
    assert torch.equal(load_images(cfg, tmp_path / "cache"), first)


def test_parquet_dataset_repository_loads_like_a_hub_dataset(tmp_path):
    repo = tmp_path / "my_org_dataset"
    (repo / "data").mkdir(parents=True)
    as_dataset(20).to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    cfg = dataset_cfg("dataset=hf", f"dataset.repo={repo}", "dataset.resolution=8", "dataset.channels=1")
    images = load_images(cfg, tmp_path / "cache")
    assert images.shape == (20, 1, 8, 8)
    with pytest.raises(DiffexpError, match=r"dataset.loader.image_column=picture: .* columns \['image', 'label'\]"):
        load_images(dataset_cfg("dataset=hf", f"dataset.repo={repo}", "dataset.image_column=picture"))


def test_flips_are_deterministic_and_both_orientations_occur(tmp_path):
    images = load_images(dataset_cfg("dataset=hf", f"dataset.repo={_saved(tmp_path)}", "dataset.resolution=8"))
    flipped = torch.cat([batches(images).get(step) for step in range(6)])
    same = torch.cat([batches(images).get(step) for step in range(6)])
    assert torch.equal(flipped, same)
    left = left_brighter(flipped)
    assert left.any() and (~left).any()
    other_seed = torch.cat([batches(images, seed=1).get(step) for step in range(6)])
    assert not torch.equal(flipped, other_seed)
    never = torch.cat([batches(images, random_flip=False).get(step) for step in range(6)])
    assert bool(left_brighter(never).all())


def _saved(tmp_path: Path) -> Path:
    as_dataset(32).save_to_disk(tmp_path / "saved32")
    return tmp_path / "saved32"


def test_random_crop_caches_a_margin_and_crops_per_image_per_epoch(tmp_path):
    cfg = dataset_cfg("dataset=hf", f"dataset.repo={_saved(tmp_path)}", "dataset.resolution=16",
                      "dataset.crop=random", "dataset.random_crop_scale=1.5")
    stored = load_images(cfg, tmp_path / "cache", crop_margin=True)
    assert stored.shape == (32, 3, 24, 24)
    assert load_images(cfg, tmp_path / "cache").shape == (32, 3, 16, 16)  # the FID real set: center windows
    with pytest.raises(DiffexpError, match="dataset.crop=diagonal: expected center or random"):
        load_images(dataset_cfg("dataset=digits", "dataset.crop=diagonal"), tmp_path / "cache")

    # A ramp whose value names its own position shows where each window was cut.
    ramp = (torch.arange(24)[:, None] * 10 + torch.arange(24)[None, :]).to(torch.uint8)
    ramps = ramp.expand(32, 1, 24, 24).contiguous()
    corners = set()
    for step in range(8):  # two epochs of 4 steps
        x = batches(ramps, random_flip=False, crop_to=16).get(step)
        assert x.shape == (8, 1, 16, 16)
        pixels = torch.round((x + 1) * 127.5).long()
        top_left = pixels[:, :, :1, :1]
        assert torch.equal(pixels, top_left + (torch.arange(16)[:, None] * 10 + torch.arange(16)[None, :]))
        corners.update(top_left.flatten().tolist())
    assert len(corners) > 4  # windows vary over images and epochs
    again = batches(ramps, random_flip=False, crop_to=16).get(5)
    assert torch.equal(again, batches(ramps, random_flip=False, crop_to=16).get(5))


def test_uncached_hub_dataset_offline_stops_with_one_line(tmp_path):
    env = cli_env(HF_HOME=str(tmp_path / "hf_home"))
    proc = run_cli("train", "debug=tiny", "dataset=cifar10", f"cache_dir={tmp_path / 'cache'}",
                   f"hydra.run.dir={tmp_path / 'run'}", check=False, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "uoft-cs/cifar10" in errors[0] and "dataset=imagefolder" in errors[0] and "dataset=digits" in errors[0]
    assert "Traceback" not in proc.stderr


def test_unreachable_hub_without_offline_flag_fails_at_once(tmp_path):
    env = {k: v for k, v in cli_env(HF_HOME=str(tmp_path / "hf_home")).items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: like a machine with no network
    # The train command, with the dataset's loading timed apart from the command's imports: datasets
    # alone retries for about 25 s before giving up.
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "train_timing_load_hub.py"), "debug=tiny",
                           "dataset=butterflies", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "huggan/smithsonian_butterflies_subset" in proc.stderr.splitlines()[-1], \
        proc.stderr[-2000:]
    [seconds] = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("load_hub seconds:")]
    assert seconds < 10


def test_train_on_a_user_image_folder_with_random_crops(image_folder, train):
    run_dir, _ = train("dataset=imagefolder", f"dataset.path={image_folder}", "dataset.crop=random")
    assert (run_dir / "model" / "model_index.json").is_file()
    losses = [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_missing_image_folder_is_one_line(tmp_path, train):
    _, proc = train("dataset=imagefolder", f"dataset.path={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: dataset.path={tmp_path / 'nowhere'}: no such directory " \
                                                   "(dataset=imagefolder needs a folder of images)"


def test_a_corrupt_image_is_one_line_naming_the_file(image_folder, train):
    (image_folder / "broken.png").write_bytes(b"not a png at all")
    run, result = train("dataset=imagefolder", f"dataset.path={image_folder}", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: dataset imagefolder: {image_folder / 'broken.png'}: cannot be read as an image (UnidentifiedImageError)")
    assert not (run / "run.json").exists()


def test_prepare_caches_a_dataset_and_prints_the_file(image_folder, tmp_path, cache_dir):
    proc = run_main("prepare", "dataset=imagefolder", f"dataset.path={image_folder}", "dataset.resolution=8",
                   f"cache_dir={cache_dir}", check=True)
    cached = Path(proc.stdout.strip().splitlines()[-1])
    assert cached.is_file() and cached.parent == cache_dir / "datasets"
    assert torch.load(cached).shape == (24, 3, 8, 8)
    bad = run_main("prepare", "dataset=imagefolder", f"dataset.path={tmp_path / 'nowhere'}", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: dataset.path=")
