"""Class-conditional generation with classifier-free guidance, DiT backbones and latent diffusion:
labels from the data, tiny runs end to end (train, resume exactly, export, reload in plain
diffusers, sample a requested class), a local randomly initialised AutoencoderKL, and mistakes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config, crashed_copy, run_main, run_train
from diffusers import AutoencoderKL, DiffusionPipeline
from PIL import Image

from diffexp.data.datasets import load_data
from diffexp.models.build import build_model
from diffexp.sampling.generate import sample_run


def losses(run):
    return [r.get("train/loss") for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_digits_and_an_image_folder_of_classes_have_labels(tmp_path, cache_dir):
    digits = load_data(compose_config(["dataset=digits"]).dataset, cache_dir, labels=True)
    assert digits.class_names == [str(i) for i in range(10)] and len(digits.labels) == len(digits.images) == 1797
    assert torch.bincount(digits.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    folder = tmp_path / "pets"
    for name, shade in (("cat", 40), ("dog", 200)):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12, 12, 3), shade + i, np.uint8)).save(folder / name / f"{i}.png")
    cfg = compose_config(["dataset=imagefolder", f"dataset.path={folder}", "dataset.resolution=8"]).dataset
    pets = load_data(cfg, cache_dir, labels=True)
    assert pets.class_names == ["cat", "dog"] and pets.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert (pets.images[pets.labels == 0].float().mean() < pets.images[pets.labels == 1].float().mean()).item()
    again = load_data(cfg, cache_dir, labels=True)  # from the cache: the labels are kept beside the pixels
    assert again.labels.tolist() == pets.labels.tolist() and again.class_names == pets.class_names


@pytest.mark.gpu
def test_a_class_conditional_unet_trains_resumes_exports_and_samples_a_class(train, tmp_path):
    common = ["conditioning=class", "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=10",
              "trainer.grid_size=20", "trainer.sample_every=0", "metric.num_samples=20"]
    full, _ = train(*common, name="full")
    crashed = crashed_copy(full, tmp_path / "crashed", checkpoint=4, logged=4)
    run_train(f"resume={crashed}")
    assert losses(crashed) == losses(full)
    # the grid: one row per class (2 images each), and the class accuracy of the evaluation
    grid = Image.open(full / "samples" / "step_0000006.png")
    assert grid.size[1] > 4 * grid.size[0]  # 10 rows of 2
    evals = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines() if '"eval/' in line]
    assert 0 <= evals[-1]["eval/class_acc_digits_20"] <= 1
    # plain diffusers: the class asked for, with guidance, the images `sample` gives
    pipe = DiffusionPipeline.from_pretrained(full / "model", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    steps = 2  # debug=tiny's
    out = pipe(batch_size=3, class_labels=pipe.get_label_ids(["7"] * 3), guidance_scale=3.0, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(5), output_type="np").images
    ours = sample_run(full, n=3, seed=5, class_label=7, guidance_scale=3.0, steps=steps)
    assert np.array_equal(np.round(out * 255).astype(np.uint8), ours.images) and ours.labels.tolist() == [7, 7, 7]
    unguided = sample_run(full, n=3, seed=5, class_label=7, guidance_scale=1.0, steps=steps)
    assert not np.array_equal(unguided.images, ours.images)  # guidance changes the images
    # the CLI: labels in the npz, every class in turn without class_label
    run_main("sample", f"run={full}", "n=12", f"out={tmp_path / 'all.npz'}", check=True)
    assert np.load(tmp_path / "all.npz")["labels"].tolist() == [i % 10 for i in range(12)]


@pytest.mark.gpu
def test_a_dit_trains_unconditional_and_class_conditional(train, tmp_path):
    net = build_model(compose_config(["model=dit_xs2"]).model, channels=1, size=8, num_classes=10)
    from diffusers.models.embeddings import LabelEmbedding

    embeddings = [m for m in net.modules() if isinstance(m, LabelEmbedding)]
    assert embeddings and all(m.dropout_prob == 0 and m.embedding_table.num_embeddings == 11 for m in embeddings)
    for conditioning in ("none", "class"):
        common = ["model=dit_xs2", f"conditioning={conditioning}", "trainer.max_steps=4", "trainer.checkpoint_every=2",
                  "trainer.keep_checkpoints=10", "metric=none"]
        full, _ = train(*common, name=f"full-{conditioning}")
        crashed = crashed_copy(full, tmp_path / f"crashed-{conditioning}", checkpoint=2, logged=3)
        run_train(f"resume={crashed}")
        assert losses(crashed) == losses(full)
        pipe = DiffusionPipeline.from_pretrained(full / "model", trust_remote_code=True)
        assert type(pipe.unet).__name__ == "DiTTransformer2DModel"
        label = 4 if conditioning == "class" else None
        samples = sample_run(full, n=2, seed=0, class_label=label)
        assert samples.images.shape == (2, 8, 8, 1)


@pytest.mark.gpu
def test_latent_diffusion_with_a_local_autoencoder_end_to_end(train, tmp_path, tiny_vae, cache_dir):
    common = ["autoencoder=kl", f"autoencoder.path={tiny_vae}", "autoencoder.scaling_factor=auto",
              "conditioning=class", "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=10",
              "metric.num_samples=20"]
    full, result = train(*common, name="full")
    assert "latents: 1797 images encoded to (2, 4, 4)" in result.stderr
    assert list((cache_dir / "datasets").glob("*-latents-*.pt"))
    crashed = crashed_copy(full, tmp_path / "crashed", checkpoint=2, logged=3)
    again = run_train(f"resume={crashed}")
    assert "latents: cached at" in again.stderr and losses(crashed) == losses(full)
    model = full / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and (model / "vae" / "config.json").is_file()
    scale = json.loads((model / "vae" / "config.json").read_text())["scaling_factor"]
    assert scale != AutoencoderKL.from_pretrained(tiny_vae).config.scaling_factor  # auto: measured on the data
    pipe = DiffusionPipeline.from_pretrained(model, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, class_labels=[1, 1], guidance_scale=2.0, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 8, 8, 1)  # decoded to pixels
    assert np.array_equal(np.round(out * 255).astype(np.uint8), sample_run(full, n=2, seed=0, class_label=1,
                                                                           guidance_scale=2.0, steps=2).images)
    result = json.loads(run_main("evaluate", f"run={full}", "metric.num_samples=20", f"cache_dir={cache_dir}", check=True)
                        .stdout.strip().splitlines()[-1])
    assert result["eval/fd_digits_20"] > 0 and 0 <= result["eval/class_acc_digits_20"] <= 1


@pytest.mark.parametrize("args,expected", [
    (["guidance_scale=2.0"], "guidance_scale=2.0: "),
    (["class_label=3"], "class_label=3: "),
])
def test_guidance_on_an_unconditional_run_is_one_line(finished_run, args, expected):
    result = run_main("sample", f"run={finished_run}", *args)
    assert result.returncode == 2 and expected in result.stderr and "is an unconditional run" in result.stderr


def test_bad_combinations_are_one_line(train, tmp_path, tiny_vae):
    conditional, _ = train("conditioning=class", "trainer.max_steps=2", "metric=none", name="conditional")
    result = run_main("sample", f"run={conditional}", "class_label=10")
    assert result.returncode == 2 and "error: class_label=10: expected a class id from 0 to 9" in result.stderr
    flat = tmp_path / "flat"  # images, but no class subfolders: no labels
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(flat / f"{i}.png")
    for overrides, expected in (
        (["autoencoder=kl", f"autoencoder.path={tiny_vae}", "dataset.channels=3"],
         f"error: autoencoder.path={tiny_vae}: it encodes 1-channel images, dataset=digits has 3"),
        (["autoencoder=kl", f"autoencoder.path={tmp_path / 'no-vae'}"], f"error: autoencoder.path={tmp_path / 'no-vae'}: "
         "no such folder, and no AutoencoderKL could be loaded there"),
        (["conditioning=class", "dataset=imagefolder", f"dataset.path={flat}", "trainer.batch_size=4"],
         "error: dataset imagefolder has no class labels (conditioning=class needs them)"),
    ):
        run, result = train(*overrides, name=f"bad{len(overrides)}", check=False)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), result.stderr[-1500:]
        assert not (run / "run.json").exists()
