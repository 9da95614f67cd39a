"""``python -m diffexp.sweep sweeps/NAME.yaml [runs=N] [sample_seed=S] [overrides]``: a W&B sweep definition, offline.

The same YAML file that ``wandb sweep`` takes runs here as one Hydra multirun of
``python -m diffexp.train``, so Hydra's launchers apply (``hydra/launcher=joblib``,
``hydra/launcher=slurm`` for SLURM via submitit, ``hydra/launcher=submitit_local``):

- ``method: grid``: every combination; Hydra's own sweeper takes the product of ``key=a,b,c``.
- ``method: random``: ``runs=N`` draws from the parameter distributions (seeded by ``sample_seed=``);
  each draw becomes an option of a generated config group ``sweep_trial`` and Hydra runs them all.
- ``method: bayes``: needs W&B's sweep server (it proposes each run from the finished ones).
  Offline it is run as ``random`` over the same space, and a line says so; ``early_terminate``
  is not applied offline either.

Overrides after the file go to every run; one that names a parameter replaces it and the
definition's keys below it (``seed=0`` runs one seed; ``metric=none`` drops ``metric.num_samples``).
A ``debug=`` config (``debug=tiny``) replaces the definition's fixed ``value:`` parameters that it
also sets (a line says which). Every run gets ``group=`` and ``name=`` from the definition's
``command``, so the runs share a group in their run directories and in W&B, and their names carry
the swept values.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from diffexp import DiffexpError, first_line
from diffexp.config import CONFIG_PATH, report_errors, split_positional

SCHEMA = "schemas/wandb_sweep_config.json"
SWEEP_OPTIONS = ("runs", "sample_seed")


def load_definition(path: str | Path) -> dict[str, Any]:
    """The sweep definition in ``path`` as a dict; DiffexpError if it is missing or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise DiffexpError(f"{path}: no such sweep definition")
    try:
        definition = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise DiffexpError(f"{path}: not valid YAML ({first_line(e)})") from e
    if not isinstance(definition, dict):
        raise DiffexpError(f"{path}: a sweep definition is a mapping (method:, parameters:, command:)")
    return definition


def schema_violations(definition: dict[str, Any]) -> list[str]:
    """What W&B's sweep-config validation rejects in ``definition`` (empty: valid).

    Uses the JSON schema of W&B's sweep engine (the ``sweeps`` package, vendored because that
    package pins numpy<2) plus the two checks it makes outside the schema: min < max, and
    categorical probabilities that match the values and sum to 1.
    """
    import jsonschema

    schema = json.loads(resources.files("diffexp").joinpath(SCHEMA).read_text())
    formats = jsonschema.FormatChecker()
    formats.checks("float")(lambda v: isinstance(v, float))
    formats.checks("integer")(lambda v: isinstance(v, int))
    validator = jsonschema.Draft7Validator(schema, format_checker=formats)
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(definition)]
    for name, spec in (definition.get("parameters") or {}).items():
        if not isinstance(spec, dict):
            continue
        lo, hi = spec.get("min"), spec.get("max")
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo >= hi:
            problems.append(f"{name}: min {lo} is not less than max {hi}")
        if "probabilities" in spec and "values" in spec:
            if len(spec["values"]) != len(spec["probabilities"]) or not math.isclose(sum(spec["probabilities"]), 1.0):
                problems.append(f"{name}: probabilities must match the values and sum to 1")
    return problems


def train_args(definition: dict[str, Any]) -> list[str]:
    """The fixed Hydra arguments of the definition's ``command`` (``group=...``), without macros.

    Refuses a command that would not run ``diffexp.train`` with Hydra-style ``key=value`` arguments.
    """
    command = [str(c) for c in definition.get("command") or []]
    if "diffexp.train" not in command or "${args_no_hyphens}" not in command:
        raise DiffexpError("command: must run `${interpreter} -m diffexp.train ... ${args_no_hyphens}` "
                           f"(Hydra-style key=value arguments), got {command}")
    after = command[command.index("diffexp.train") + 1:]
    return [a for a in after if not a.startswith("${")]


def _values(spec: dict[str, Any]) -> list[Any] | None:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return None


def draw(spec: dict[str, Any], rng: random.Random) -> Any:
    """One random draw from a W&B parameter definition (the distributions diffexp's sweeps use)."""
    values = _values(spec)
    if values is not None:
        return rng.choices(values, weights=spec.get("probabilities"))[0]
    dist = spec.get("distribution") or ("int_uniform" if isinstance(spec.get("min"), int)
                                        and isinstance(spec.get("max"), int) else "uniform")
    lo, hi = spec["min"], spec["max"]
    if dist == "int_uniform":
        return rng.randint(lo, hi)
    # Three significant digits keep run names and tables readable (0.000312, not 0.00031234567891).
    if dist == "uniform":
        return float(f"{rng.uniform(lo, hi):.3g}")
    if dist == "log_uniform_values":
        return float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}")
    if dist == "log_uniform":  # W&B: min and max are natural logs
        return float(f"{math.exp(rng.uniform(lo, hi)):.3g}")
    raise DiffexpError(f"distribution={dist}: offline sweeps draw from values, uniform, int_uniform, "
                       "log_uniform and log_uniform_values")


def space(definition: dict[str, Any]) -> dict[str, list[Any]]:
    """Per parameter, the values that stand for its range: all listed values, or min and max.

    For a grid this is the whole grid; for a random or Bayesian space its corners, which is what a
    composition check needs (types and bounds).
    """
    out = {}
    for name, spec in (definition.get("parameters") or {}).items():
        values = _values(spec)
        if values is None:
            lo, hi = spec["min"], spec["max"]
            if spec.get("distribution") == "log_uniform":
                lo, hi = math.exp(lo), math.exp(hi)
            values = [lo, hi]
        out[name] = values
    return out


def combinations(definition: dict[str, Any]) -> list[list[str]]:
    """Every run's overrides for a grid (or the corners of a random/Bayesian space), as the W&B
    agent writes them: the command's fixed arguments, then ``key=str(value)``."""
    fixed = train_args(definition)
    params = space(definition)
    return [fixed + [f"{k}={v}" for k, v in zip(params, combo)] for combo in itertools.product(*params.values())]


def override_key(override: str) -> str:
    """``model`` for ``model=unet_tiny``, ``trainer.lr`` for ``+trainer.lr=1``."""
    return override.split("=", 1)[0].lstrip("+~")


def _hydra_value(v: Any) -> str:
    text = str(v)  # what W&B's agent writes (str(value))
    return f"'{text}'" if any(c in text for c in ",[]{}()= ") else text


def debug_settings(overrides: list[str]) -> tuple[str | None, set[str]]:
    """The ``debug=`` option among ``overrides`` and the keys its config sets (``trainer.max_steps``;
    ``model`` for its ``override /model``); (None, empty) without one."""
    option = next((o.split("=", 1)[1] for o in overrides if override_key(o) == "debug"), None)
    path = Path(CONFIG_PATH) / "debug" / f"{option}.yaml"
    if option is None or not path.is_file():  # an unknown option is Hydra's to report
        return option, set()
    body = yaml.safe_load(path.read_text()) or {}
    keys = {k.removeprefix("override").strip().lstrip("/") for entry in body.pop("defaults", None) or []
            if isinstance(entry, dict) for k in entry}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                keys.add(f"{prefix}{k}")

    walk(body, "")
    return option, keys


def yield_to_debug(params: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``params`` without the fixed (``value:``) ones that the ``debug=`` config also sets, and a note.

    A fixed value would reach the runs as a command-line override, which beats any config file, so
    ``debug=tiny`` would train the sweep's 3000 steps. Swept values stay: they are the experiment.
    """
    option, keys = debug_settings(overrides)
    dropped = {k: spec["value"] for k, spec in params.items()
               if "value" in spec and any(k == d or k.startswith(d + ".") for d in keys)}
    if not dropped:
        return params, []
    note = (f"note: debug={option} replaces the sweep's fixed "
            f"{', '.join(f'{k}={v}' for k, v in dropped.items())} with its own settings")
    return {k: v for k, v in params.items() if k not in dropped}, [note]


def multirun_args(definition: dict[str, Any], overrides: list[str], sweep_dir: Path, runs: int | None,
                  sample_seed: int) -> tuple[list[str], list[str]]:
    """(arguments for ``python -m diffexp.train -m``, notes to print) running ``definition`` offline."""
    method = definition.get("method")
    user_keys = {override_key(o) for o in overrides}
    # An override replaces the definition's own setting of that key and of the keys below it:
    # metric=none also drops the definition's metric.num_samples (metric=none has no such key).
    mine = lambda key: any(key == u or key.startswith(u + ".") for u in user_keys)  # noqa: E731
    params = {k: v for k, v in (definition.get("parameters") or {}).items() if not mine(k)}
    params, notes = yield_to_debug(params, overrides)
    fixed = [a for a in train_args(definition) if not mine(override_key(a))]
    args = [*fixed, f"hydra.sweep.dir={sweep_dir}"]
    if method == "grid":
        for k, spec in params.items():
            values = _values(spec)
            if values is None:
                raise DiffexpError(f"parameters.{k}: a grid needs values (or value), not a distribution")
            args.append(f"{k}={','.join(_hydra_value(v) for v in values)}")
        return [*args, *overrides], notes
    if method not in ("random", "bayes"):
        raise DiffexpError(f"method={method}: expected grid, random or bayes")
    if method == "bayes":
        notes.append("note: method=bayes needs the W&B sweep server (`wandb sweep` + `wandb agent`); offline this "
                     "samples the same space at random instead, and early_terminate is not applied")
    n = runs or definition.get("run_cap") or 10
    rng = random.Random(sample_seed)
    trial_dir = sweep_dir / "trials"
    (trial_dir / "sweep_trial").mkdir(parents=True, exist_ok=True)
    groups = {p.name for p in Path(CONFIG_PATH).iterdir() if p.is_dir()}
    names = []
    for i in range(n):
        drawn = {k: draw(spec, rng) for k, spec in params.items()}
        names.append(f"{i:03d}")
        write_trial(trial_dir / "sweep_trial" / f"{i:03d}.yaml", drawn, groups)
    notes.append(f"note: {n} random draws (sample_seed={sample_seed}) written to {trial_dir}/sweep_trial/")
    args += [f"hydra.searchpath=[file://{trial_dir.resolve()}]", f"+sweep_trial={','.join(names)}"]
    return [*args, *overrides], notes


def write_trial(path: Path, drawn: dict[str, Any], groups: set[str]) -> None:
    """A ``# @package _global_`` config that sets one random draw (group choices via defaults)."""
    defaults = [{f"override /{k}": v} for k, v in drawn.items() if k in groups]
    values: dict[str, Any] = {}
    for k, v in drawn.items():
        if k in groups:
            continue
        node = values
        *parents, leaf = k.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v
    body = yaml.safe_dump({"defaults": [*defaults, "_self_"], **values}, sort_keys=False)
    path.write_text("# @package _global_\n" + body)


def parse_args(argv: list[str]) -> tuple[str, dict[str, int], list[str]]:
    """(definition path, sweep options, overrides for the runs) from the command line.

    The definition is the one positional argument, found as ``compare`` and ``runs`` find their paths
    (``config.split_positional``); ``runs=`` and ``sample_seed=`` are sweep's own. Everything else
    passes through untouched to ``python -m diffexp.train -m``: those are train's overrides in Hydra's
    multirun grammar (``model=unet_tiny,unet_small`` is a sweep over two models), which only train's
    Hydra app can parse and check against train's config, so sweep is not a Hydra app of its own.
    """
    positional, overrides, flags = split_positional(argv)
    if len(positional) != 1:
        raise DiffexpError("usage: python -m diffexp.sweep sweeps/NAME.yaml [runs=N] [sample_seed=S] [overrides]")
    options, passed = {}, []
    for a in overrides:
        key, _, value = a.partition("=")
        if key not in SWEEP_OPTIONS:
            passed.append(a)
            continue
        try:
            options[key] = int(value)
        except ValueError:
            raise DiffexpError(f"{a}: expected an integer") from None
    return positional[0], options, [*passed, *flags]


def sweep_dir_for(definition: dict[str, Any], overrides: list[str]) -> Path:
    """Where the multirun goes: ``hydra.sweep.dir=`` if given, else outputs/multirun/DATE/TIME_NAME."""
    for o in overrides:
        if override_key(o) == "hydra.sweep.dir":
            return Path(o.split("=", 1)[1])
    root = next((o.split("=", 1)[1] for o in overrides if override_key(o) == "output_root"), "outputs")
    return Path(root) / "multirun" / f"{datetime.now():%Y-%m-%d}" / f"{datetime.now():%H-%M-%S}_{definition.get('name', 'sweep')}"


def main(argv: list[str] | None = None) -> int:
    """Validate the definition, expand it, run ``python -m diffexp.train -m ...``; its exit status."""
    with report_errors():
        path, options, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        definition = load_definition(path)
        problems = schema_violations(definition)
        if problems:
            raise DiffexpError(f"{path}: not a valid W&B sweep definition: {'; '.join(problems)}")
        sweep_dir = sweep_dir_for(definition, overrides)
        overrides = [o for o in overrides if override_key(o) != "hydra.sweep.dir"]
        args, notes = multirun_args(definition, overrides, sweep_dir, options.get("runs"), options.get("sample_seed", 0))
    for note in notes:
        print(note, flush=True)
    command = [sys.executable, "-m", "diffexp.train", "-m", *args]
    print("running:", " ".join(command[1:]), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
