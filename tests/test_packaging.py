"""Packaging must not replace a Jetson's GPU ONNX Runtime (issue 15, item 6).

JetPack's ``onnxruntime-gpu`` and PyPI's CPU ``onnxruntime`` both own the ``onnxruntime``
package, so a hard ``onnxruntime`` dependency would install the CPU wheel over the GPU one
and ``CUDAExecutionProvider`` would vanish silently. The CPU wheel is the ``cpu`` extra
(also inside ``dev``); scripts/install.sh picks it only off-Jetson with no onnxruntime-gpu.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SH = ROOT / "scripts" / "install.sh"


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_plain_install_does_not_require_onnxruntime() -> None:
    project = _project()
    assert "onnxruntime" not in {_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert "onnxruntime" in {_name(r) for r in extras["cpu"]}
    assert "onnxruntime" in {_name(r) for r in extras["dev"]}  # CI (install.sh --dev) gets it
    # the Jetson flavour of dev is dev without the CPU wheel
    assert {_name(r) for r in extras["dev-jetson"]} == {_name(r) for r in extras["dev"]} - {
        "onnxruntime"
    }


def _fake_dist(site: Path, name: str, version: str, module: str | None = None) -> None:
    """A stand-in installed distribution: a dist-info directory (and optionally a module)."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    records = [f"{info.name}/METADATA,,", f"{info.name}/INSTALLER,,", f"{info.name}/RECORD,,"]
    if module:
        (site / module).mkdir()
        (site / module / "__init__.py").write_text("STAND_IN = True\n")
        records.append(f"{module}/__init__.py,,")
    (info / "RECORD").write_text("\n".join(records) + "\n")


def _ort_extras(want: str, *, py: str, env: dict[str, str]) -> str:
    script = f'source "{INSTALL_SH}"; ort_extras "{want}"'
    run = subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, "PY": py, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_install_script_leaves_an_installed_onnxruntime_gpu_alone(tmp_path: Path) -> None:
    """ort_extras, the selection install.sh runs, against fake metadata on PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir()
    no_tegra = {"TEGRA_RELEASE": str(tmp_path / "no_nv_tegra_release")}
    empty = {**no_tegra, "PYTHONPATH": str(site)}
    # a desktop or CI box: the CPU wheel comes along
    assert _ort_extras("dev", py=sys.executable, env=empty) == "[dev]"
    assert _ort_extras("", py=sys.executable, env=empty) == "[cpu]"
    # onnxruntime-gpu installed (any machine): never the CPU wheel
    _fake_dist(site, "onnxruntime-gpu", "1.18.0")
    assert _ort_extras("dev", py=sys.executable, env=empty) == "[dev-jetson]"
    assert _ort_extras("", py=sys.executable, env=empty) == ""
    # a Jetson (L4T release file) without onnxruntime-gpu yet: still not the CPU wheel
    tegra = tmp_path / "nv_tegra_release"
    tegra.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n")
    jetson = {"TEGRA_RELEASE": str(tegra), "PYTHONPATH": str(tmp_path / "empty")}
    assert _ort_extras("dev", py=sys.executable, env=jetson) == "[dev-jetson]"
    assert _ort_extras("", py=sys.executable, env=jetson) == ""


def _copy_project(dst: Path) -> Path:
    dst.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "*.so")
    for item in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / item, dst / item)
    for pkg in ("edge_runtime", "kernels", "firmware_configs"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=skip)
    return dst


@pytest.mark.timeout(300)
def test_pip_install_in_a_venv_keeps_the_stand_in_onnxruntime_gpu(tmp_path: Path) -> None:
    """A clean venv holding a stand-in ``onnxruntime-gpu`` (which, like the real one, owns the
    ``onnxruntime`` module): ``pip install .`` offline leaves it in place, and the installed
    metadata asks for ``onnxruntime`` only under an extra."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    site = Path(
        subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    _fake_dist(site, "onnxruntime-gpu", "1.18.0", module="onnxruntime")
    src = _copy_project(tmp_path / "src")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    clean["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # Build the wheel offline with this interpreter's setuptools (the venv's bundled one
    # has no bdist_wheel), then install it into the venv: --no-deps since nothing can be
    # fetched offline; the dependency check is on the installed metadata below.
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-deps",
         "--no-build-isolation", "-w", str(wheels), str(src)],
        env=clean, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel offline here: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("edge_runtime-*.whl")
    run = subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)],
        env=clean, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    probe = (
        "import importlib.metadata as m, json, onnxruntime;"
        "reqs = m.requires('edge-runtime') or [];"
        "names = sorted(d.metadata['Name'] for d in m.distributions());"
        "print(json.dumps([m.version('onnxruntime-gpu'), onnxruntime.STAND_IN, reqs, names]))"
    )
    out = subprocess.check_output([py, "-c", probe], env=clean, text=True, cwd=tmp_path)
    gpu_version, stand_in, reqs, names = json.loads(out)
    assert gpu_version == "1.18.0" and stand_in is True  # the GPU build's module is untouched
    assert "onnxruntime" not in names  # no CPU wheel next to it
    ort = [r for r in reqs if _name(r) == "onnxruntime"]
    assert ort and all("extra ==" in r for r in ort), reqs  # only under extras
    assert {re.search(r'extra == "([^"]+)"', r).group(1) for r in ort} == {"cpu", "dev"}
    # and the install script's selection in that venv keeps it
    no_tegra = {"TEGRA_RELEASE": str(tmp_path / "none")}
    assert _ort_extras("dev", py=py, env=no_tegra) == "[dev-jetson]"
