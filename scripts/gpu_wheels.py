"""Fetch the wheels the GPU machine lacks, for ``scripts/gpu_check.sh`` (run here, where pip reaches PyPI).

The device machine has no network and its own Python 3.12 with PyTorch and much else
(``scripts/device_packages.txt``). This walks diffexp's run-time dependency tree as installed in this
virtual environment, keeps the packages the device lacks, and downloads each at the version installed
here as a CPython 3.12 manylinux wheel into ``.whl/`` (ignored by git; the device call carries it)::

    .venv/bin/python scripts/gpu_wheels.py            # then: run(carry=[".whl"], command="bash scripts/gpu_check.sh")

Packages left out on purpose (``SKIP``): the app's (gradio) and the SLURM launchers, which no GPU check runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64",
                                                                                   "manylinux1_x86_64"]
SKIP = {"gradio", "gradio-client", "hydra-submitit-launcher", "hydra-joblib-launcher", "submitit", "playwright"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(name: str) -> list[str]:
    """The names a package requires unconditionally (no extras, markers that hold here)."""
    from packaging.requirements import Requirement

    out = []
    for text in metadata.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req.name)
    return out


def missing_on_device() -> dict[str, str]:
    """name -> version installed here, for diffexp's dependency closure minus the device's packages."""
    lines = (ROOT / "scripts" / "device_packages.txt").read_text().splitlines()
    there = {canonical(n) for n in lines if n.strip() and not n.startswith("#")}
    todo, seen = requirements("diffexp"), {}
    while todo:
        name = canonical(todo.pop())
        if name in seen or name in there or name in SKIP:
            continue
        seen[name] = metadata.version(name)
        todo.extend(requirements(name))
    return seen


def main() -> None:
    dest = ROOT / ".whl"
    dest.mkdir(exist_ok=True)
    wanted = missing_on_device()
    print(f"{len(wanted)} packages missing on the device: " + ", ".join(f"{n}=={v}" for n, v in sorted(wanted.items())))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    for name, version in sorted(wanted.items()):
        spec = f"{name}=={version}"
        binary = [*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                  "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), spec]
        if subprocess.run(binary, capture_output=True).returncode != 0:  # a source-only package: build it here
            subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(dest), spec], check=True)
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels in {dest}, {size / 2**20:.1f} MiB (a device call carries 64 MiB at most)")


if __name__ == "__main__":
    main()
