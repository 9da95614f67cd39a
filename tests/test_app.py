"""``python -m diffexp.app`` as a user meets it: the real server on 127.0.0.1 over a folder of runs,
called through ``gradio_client`` and driven in a real headless Chromium (Debian's ``chromium``
through Playwright's Python package), where the browser test takes a screenshot (the README's comes
from a real default run: scripts/app_screenshot.py).

One server for the module: ``digits16`` (a 16 px run of 30 steps), ``tiny``
(the module's tiny run), ``cond`` (a class-conditional tiny run of 2 steps), ``broken`` (config.yaml is not
YAML) and ``unfinished`` (still running, no ``model/`` yet: its checkpoint of step 2 is its model); and,
once a test asks for it, ``swept`` (the tiny run with an evaluation sweep in its eval.json).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, cli_env, crashed_copy, run_main, run_train
from PIL import Image

from diffexp.records.rundir import RunDir

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
DIGITS16_STEPS = 30  # the tests need a finished run with 3 evaluations
# Without the background-networking flags Chromium's own connections are refused on a closed network.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run, dataset_cache) -> Path:
    """The runs folder the server shows (see the module docstring)."""
    root = tmp_path_factory.mktemp("app") / "outputs"
    root.mkdir()
    cache = root.parent / "cache"
    cache.mkdir()
    (cache / "datasets").symlink_to(dataset_cache, target_is_directory=True)
    run_train(*TINY, f"cache_dir={cache}", "logger=none", "name=digits16", "dataset.resolution=16",
              f"trainer.max_steps={DIGITS16_STEPS}", "trainer.batch_size=32", "trainer.lr=2e-3", "trainer.log_every=10",
              f"trainer.sample_every={DIGITS16_STEPS // 3}", f"trainer.checkpoint_every={DIGITS16_STEPS}",
              "sampler.steps=20", f"trainer.eval_every={DIGITS16_STEPS // 3}",
              "metric.num_samples=60", run_dir=root / "digits16")  # > the tiny runs' 50: it leads the table
    shutil.copytree(tiny_run, root / "tiny", symlinks=True)
    run_train(*TINY, f"cache_dir={cache}", "logger=none", "conditioning=class", "trainer.max_steps=2", "metric=none",
              "trainer.sample_every=0", "trainer.checkpoint_every=0", run_dir=root / "cond")
    broken = shutil.copytree(tiny_run, root / "broken", symlinks=True)
    (broken / "config.yaml").write_text("model: [unclosed\n")
    RunDir(crashed_copy(tiny_run, root / "unfinished", checkpoint=2, logged=2)).update_info(status="running", end=None)
    return root


@pytest.fixture(scope="module")
def swept(runs) -> Path:
    """``swept``: a copy of the tiny run evaluated over its checkpoints (2, 4) and sampler steps (2, 3), with
    two sampling seeds each (``python -m diffexp.evaluate -m``), moved into the runs folder when done."""
    run = Path(shutil.copytree(runs / "tiny", runs.parent / "swept", symlinks=True))
    run_main("evaluate", "-m", f"run={run}", "checkpoint=2,4", "sampler.steps=2,3", "seed=0,1", *evaluate_tiny(runs),
             check=True)
    return run.rename(runs / "swept")


def evaluate_tiny(runs: Path) -> list[str]:
    """evaluate's overrides for a quick score of 4 samples against 8 real images (the runs' cache)."""
    return ["metric.num_samples=4", "metric.num_real=8", "metric.batch_size=4", f"cache_dir={runs.parent / 'cache'}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """``python -m diffexp.app app.runs=outputs app.port=PORT`` in a subprocess, beside the runs
    folder; yields its URL, then stops it with Ctrl-C (SIGINT) as a user would."""
    port = free_port()
    logs = tmp_path_factory.mktemp("app") / "server.log"
    env = cli_env(GRADIO_TEMP_DIR=str(logs.parent / "gradio"))
    with logs.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "diffexp.app", "app.runs=outputs", f"app.port={port}",
                                 "app.refresh_s=1"], cwd=runs.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the app did not start (exit {proc.poll()}):\n{logs.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the app did not stop on Ctrl-C")
    assert "Traceback" not in logs.read_text(), logs.read_text()[-4000:]


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def sample(client, run, *, sampler="ddim", steps=5, seed=3, n=6, checkpoint="model"):
    """The page's Sample button through the API: (grid file, line, [npz, png])."""
    return client.predict(run, sampler, steps, seed, n, None, 1.0, checkpoint, api_name="/sample")


def test_lists_runs_with_their_summary_and_says_which_folder_cannot_be_read(client, runs):
    listed = client.predict(api_name="/list_runs")
    rows = {r["run"]: r for r in listed["runs"]}
    assert listed["root"] == str(runs.resolve())
    assert {"digits16", "tiny", "broken", "unfinished"} <= set(rows)
    d16 = rows["digits16"]
    assert (d16["name"], d16["status"], d16["steps"], d16["dataset"], d16["model"], d16["objective"]) == (
        "digits16", "finished", str(DIGITS16_STEPS), "digits", "unet_tiny", "cosine, epsilon")
    assert float(d16["final loss"]) < 0.5
    fds = [r["eval/fd_digits_60"] for r in RunDir(runs / "digits16").metrics() if "eval/fd_digits_60" in r]
    assert len(fds) == 3 and rows["digits16"]["best eval/fd_digits_60 ↓"] == f"{min(fds):.4g}"
    assert rows["unfinished"]["status"] == "running"
    assert rows["broken"]["status"] == "unreadable"
    assert any(p.startswith("`broken`: ") and "config.yaml: cannot be read as a saved config" in p
               for p in listed["problems"]), listed["problems"]


def test_samples_as_the_cli_does_for_the_same_seed(client, runs, tmp_path):
    grid_file, line, (npz, png) = sample(client, "digits16")
    assert line.startswith("6 images of 16×16 px, ddim in 5 steps, seed 3: ") and line.endswith(" s on cpu")
    assert Path(npz).name == "digits16_ddim_5steps_s3.npz" and Path(png).suffix == ".png"
    run_main("sample", f"run={runs / 'digits16'}", "n=6", "sampler=ddim", "sampler.steps=5", "seed=3",
            f"out={tmp_path / 'cli.npz'}", check=True)
    ours, theirs = np.load(npz), np.load(tmp_path / "cli.npz")
    assert ours.files == theirs.files == ["images"]
    assert ours["images"].dtype == np.uint8 and ours["images"].shape == (6, 16, 16, 1)
    assert np.array_equal(ours["images"], theirs["images"])
    assert np.array_equal(np.asarray(Image.open(grid_file)), np.asarray(Image.open(tmp_path / "cli.png")))
    # The run's own sampler (sampler= left out on the command line), and another seed.
    from diffexp.sampling.generate import sample_run

    _, line, (own, _) = sample(client, "digits16", sampler="own", steps=4, seed=7, n=3)
    assert "dpmpp_sde in 4 steps, seed 7" in line
    assert np.array_equal(np.load(own)["images"], sample_run(runs / "digits16", n=3, seed=7, steps=4).images)
    assert not np.array_equal(np.load(own)["images"], ours["images"][:3])


def test_compares_runs_side_by_side_with_the_same_settings(client):
    gallery, lines = client.predict(["digits16", "tiny", "unfinished"], "dpmpp", 3, 1, 4, None, 1.0,
                                    api_name="/compare")
    assert [g["caption"] for g in gallery] == ["digits16", "tiny", "unfinished"]  # its newest checkpoint
    for item in gallery:  # each grid is the one that run gives alone with these settings
        alone, _, _ = sample(client, item["caption"], sampler="dpmpp", steps=3, seed=1, n=4)
        assert np.array_equal(np.asarray(Image.open(item["image"])), np.asarray(Image.open(alone)))
    assert "- `digits16`: 4 images of 16×16 px, dpmpp in 3 steps, seed 1: " in lines
    assert "- `tiny`: 4 images of 8×8 px, dpmpp in 3 steps, seed 1: " in lines
    assert "- `unfinished`: 4 images of 8×8 px, dpmpp in 3 steps, seed 1: " in lines


def test_the_api_asks_a_class_with_the_run_s_own_steps_and_guidance_and_guides_by_a_run(client, runs):
    from gradio_client.exceptions import AppError

    from diffexp.sampling.generate import sample_run

    # empty steps and guidance scale: the run's own (2 steps, classifier-free 2.0), as the command line
    _, line, (npz, _) = client.predict("cond", "own", None, 0, 3, 7, None, api_name="/sample")
    assert " in 2 steps, seed 0" in line
    drawn = np.load(npz)
    assert drawn["labels"].tolist() == [7, 7, 7]
    assert np.array_equal(drawn["images"], sample_run(runs / "cond", n=3, seed=0, class_label=7).images)
    unguided = sample_run(runs / "cond", n=3, seed=0, class_label=7, guidance_scale=1.0).images
    assert not np.array_equal(drawn["images"], unguided)
    # a guide, a guidance interval and a checkpoint pass through to sampling (a guide of other data is refused)
    with pytest.raises(AppError, match="guide=digits16: its resolution is 16, the run's 8"):
        client.predict("tiny", "own", None, 0, 2, None, 2.0, None, "digits16", None, "0.2, 0.8", api_name="/sample")
    with pytest.raises(AppError, match="guidance interval=0.2: give two fractions"):
        client.predict("tiny", "own", None, 0, 2, None, 2.0, None, "cond", None, "0.2", api_name="/sample")


def test_a_bad_run_is_a_clear_message_never_a_traceback(client):
    from gradio_client.exceptions import AppError

    for run, checkpoint, says in (("unfinished", "9", "checkpoint=9: "),
                                  ("tiny", "soon", "checkpoint=soon: expected a checkpoint step, last or best"),
                                  ("broken", "model", "config.yaml: "),
                                  ("../..", "model", "not below"),
                                  ("", "model", "no run selected")):
        with pytest.raises(AppError) as refused:
            sample(client, run, checkpoint=checkpoint)
        assert says in str(refused.value) and "Traceback" not in str(refused.value)
    with pytest.raises(AppError, match="pick two or more runs"):
        client.predict(["digits16"], "ddim", 2, 0, 1, None, 1.0, api_name="/compare")
    status, *_ = client.predict("broken", api_name="/show_run")
    assert status.startswith("⚠ **broken**: ") and "config.yaml: cannot be read as a saved config" in status \
        and "Traceback" not in status
    missing = run_main("app", "app.runs=no/such/folder", check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == "error: app.runs=no/such/folder: no such folder"


def test_shows_an_evaluation_sweep_as_compare_reports_it_and_writes_nothing_into_the_run(client, swept, tmp_path):
    files = {p: p.stat().st_mtime_ns for p in swept.rglob("*")}
    line, plots, table, best = client.predict("swept", api_name="/evaluations")
    run_main("compare", str(swept), f"out={tmp_path / 'cmp'}", check=True)
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    report = (tmp_path / "cmp" / "report.md").read_text()

    # the best setting: compare's line and numbers, and the best mean over the two sampling seeds of eval.json
    [note] = [n for n in summary["notes"] if n.startswith("best evaluation setting")]
    assert line.startswith(f"**{note}**") and "8 results" in line
    assert best == {k: v for k, v in summary["samplers"]["best_setting"][0].items() if k != "axes"}
    fd: dict[tuple, list[float]] = {}
    for r in json.loads((swept / "eval.json").read_text())["results"]:
        fd.setdefault((r["checkpoint"], r["sampler_steps"]), []).append(r["eval/fd_digits_4"])
    (checkpoint, steps), values = min(fd.items(), key=lambda kv: np.mean(kv[1]))
    assert (best["setting"], best["steps"], best["n"]) == ({"checkpoint": checkpoint}, steps, 2)
    assert best["eval/fd_digits_4"]["mean"] == pytest.approx(np.mean(values)) and best["eval/fd_digits_4"]["ci95"] > 0
    assert f"best evaluation setting: checkpoint={checkpoint}, dpmpp_sde {steps} steps" in note

    # a plot per setting that varies, the very one compare draws, under compare's title
    drawn = dict(re.findall(r"!\[([^]]+)\]\((eval_vs_\w+\.png)\)", report))
    assert sorted(drawn.values()) == ["eval_vs_checkpoint.png", "eval_vs_sampler_steps.png"]
    assert [p["caption"] for p in plots] == list(drawn)
    for plot, file in zip(plots, drawn.values()):
        assert np.array_equal(np.asarray(Image.open(plot["image"])), np.asarray(Image.open(tmp_path / "cmp" / file)))
    assert len(table["data"]) == 4 and table["headers"][:3] == ["checkpoint", "sampler", "steps"]
    assert {p: p.stat().st_mtime_ns for p in swept.rglob("*")} == files  # the app wrote nothing into the run

    # a run without a sweep says so in one line
    line, plots, table, best = client.predict("tiny", api_name="/evaluations")
    assert line.startswith("No evaluation sweep: no `python -m diffexp.evaluate` results in eval.json") \
        and "\n" not in line and not plots and best is None


@pytest.fixture(scope="module")
def browser_page(request):
    """One headless Chromium page for the module, on the app's URL (skipped, before any server
    starts, where Chromium or Playwright is missing)."""
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does) to run the browser test")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install -e '.[test]'")
    server = request.getfixturevalue("server")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="diffexp-chromium-"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(server)
        yield page
        context.close()


def test_in_a_browser_select_a_run_sample_and_screenshot(browser_page, runs, tiny_run, swept, tmp_path):
    page = browser_page
    table = page.locator("#runs-table")
    table.get_by_text("digits16", exact=True).filter(visible=True).first.click()
    page.locator("#run-status").get_by_text("finished").wait_for()
    assert "digits16" in page.locator("#run-status").inner_text()
    assert "config.yaml: cannot be read as a saved config" in page.locator("#runs-note").inner_text()
    page.get_by_role("tab", name="Sample").click()
    # the run's own sampling settings fill in after its view (a slow machine may take seconds)
    page.wait_for_function("() => ['', '0'].indexOf(document.querySelector('#steps input').value) < 0")
    page.locator("#sample-button").click()
    page.locator("#sampled img").wait_for()
    page.locator("#sampled-info").get_by_text("16 images of 16×16 px").wait_for()
    screenshot = tmp_path / "app.png"
    page.screenshot(path=screenshot, full_page=True)
    assert Image.open(screenshot).size[0] == 1400

    # A run that appears while the page is open shows up at the next refresh (app.refresh_s=1).
    shutil.copytree(tiny_run, runs / "later", symlinks=True)
    try:
        table.get_by_text("later", exact=True).filter(visible=True).first.wait_for(timeout=15_000)
    finally:
        shutil.rmtree(runs / "later")
    # A run with no model yet samples its newest checkpoint.
    page.locator("#run-menu input").fill("unfinished")
    page.locator("#run-menu input").press("Enter")
    page.locator("#run-status").get_by_text("running").wait_for()
    page.locator("#sample-button").click()
    page.locator("#sampled-info").get_by_text("16 images of 8×8 px").wait_for()

    # The Evaluations tab of a run with an evaluation sweep: the best setting and a plot per setting.
    page.locator("#run-menu input").fill("swept")
    page.locator("#run-menu input").press("Enter")
    page.get_by_role("tab", name="Evaluations").click()
    page.locator("#evaluations-status").get_by_text("best evaluation setting: checkpoint=").wait_for()
    page.locator("#evaluation-plots img").nth(1).wait_for()  # shown after the line, once its files are in
    assert page.locator("#evaluation-plots img").count() == 2
    page.screenshot(path=tmp_path / "evaluations.png", full_page=True)
    # a result added while the page is open shows at the next refresh
    run_main("evaluate", f"run={swept}", "checkpoint=4", "sampler.steps=2", "seed=2", *evaluate_tiny(runs),
             check=True)
    page.locator("#evaluations-status").get_by_text("9 results").wait_for(timeout=15_000)
    assert "Traceback" not in page.content()
