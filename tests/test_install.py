"""Installing beside an image's own torch: declared ranges, the offline wheel folder, the gather logic.

The "image" here is a venv without pip that sees the project venv's packages (torch among them) through
a folder of links, minus mtu_dist itself: what a GPU image with its own torch and no mtu_dist looks like.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
FREEZE = ROOT / "launch" / "offline" / "gpu-image-freeze.txt"


def _gather():
    spec = importlib.util.spec_from_file_location("gather_wheels", ROOT / "launch" / "offline" / "gather_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_declared_ranges_admit_the_gpu_image():
    """A common CUDA image: Python 3.12.3, torch 2.11.0, torchvision 0.26.0, accelerate 1.15.0 (its
    freeze is committed); every project requirement it already has must be satisfied as it is."""
    image = _gather().read_pins(FREEZE)
    assert (image["torch"], image["torchvision"], image["accelerate"]) == ("2.11.0", "0.26.0", "1.15.0")
    project = _project()
    assert SpecifierSet(project["requires-python"]).contains("3.12.3")
    assert SpecifierSet(project["requires-python"]).contains("3.11.7")
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["deepspeed"]]
    checked = []
    for req in reqs:
        have = image.get(_gather().normalize(req.name))
        if have is not None:
            assert req.specifier.contains(have, prereleases=True), f"{req} rejects the image's {have}"
            checked.append(req.name)
    assert {"torch", "torchvision", "accelerate", "transformers", "numpy"} <= set(checked)


def test_constraints_pin_every_declared_dependency_within_its_range():
    """The lock (constraints.txt) pins each declared dependency exactly, inside the declared range."""
    pins = _gather().read_pins(ROOT / "constraints.txt")
    project = _project()
    for raw in project["dependencies"] + project["optional-dependencies"]["deepspeed"]:
        req = Requirement(raw)
        name = _gather().normalize(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} rejects the pinned {pins[name]}"


def test_gather_fetches_what_the_target_lacks_and_refuses_to_touch_its_torch():
    g = _gather()
    target = {"torch": "2.11.0", "numpy": "2.5.2", "certifi": "2026.7.22"}
    report = {
        "install": [
            {"metadata": {"name": "MLflow", "version": "3.17.2"}},
            {"metadata": {"name": "certifi", "version": "2026.10.19"}},
        ]
    }
    assert g.to_fetch(report, target) == [("certifi", "2026.10.19"), ("mlflow", "3.17.2")]
    report["install"].append({"metadata": {"name": "torch", "version": "2.14.1"}})
    with pytest.raises(g.GatherError, match="torch==2.14.1 but the target's image has 2.11.0"):
        g.to_fetch(report, target)
    # the lock pins the project's own dependencies the target lacks, never the target's, never transitive ones
    lock = {"mlflow": "3.17.2", "torch": "2.14.1", "databricks-sdk": "0.167.0"}
    assert g.lock_constraints(target, lock, {"mlflow", "torch"}) == "mlflow==3.17.2\n"


def test_gather_reads_a_freeze_and_names_a_bad_one(tmp_path):
    g = _gather()
    freeze = tmp_path / "freeze.txt"
    freeze.write_text(
        "PyYAML==6.0.3\n-e git+https://example.invalid/x#egg=x\nfoo @ file:///x.whl\ntorch==2.11.0+cu130\n"
    )
    assert g.read_pins(freeze) == {"pyyaml": "6.0.3", "torch": "2.11.0+cu130"}
    freeze.write_text("not a freeze\n")
    with pytest.raises(g.GatherError, match="no `name==version` line"):
        g.read_pins(freeze)
    # the stub environment that pip resolves against carries one metadata-only dist-info per package
    stubs = g.stub_environment(tmp_path / "env", {"torch": "2.11.0"})
    assert (stubs / "torch-2.11.0.dist-info" / "METADATA").read_text().startswith("Metadata-Version")


def _image_without_mtu(tmp: Path) -> Path:
    """A folder of links to the project venv's packages except mtu_dist: an image that has torch."""
    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp / "image-site"
    farm.mkdir()
    for entry in site.iterdir():
        if "mtu_dist" in entry.name or entry.name.endswith(".pth"):
            continue
        (farm / entry.name).symlink_to(entry)
    return farm


@pytest.mark.slow
def test_offline_install_from_a_wheel_folder_leaves_torch_alone(tmp_path):
    """launch/offline/install.sh --venv: index off (PIP_NO_INDEX and --no-index), only the project
    wheel in the folder; torch comes from the image, unchanged; pip's own dry-run report agrees that
    installing next to an installed torch installs nothing but mtu_dist."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    image = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(image)], check=True)
    image_site = subprocess.run(
        [str(image / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(image_site, "image.pth").write_text(str(_image_without_mtu(tmp_path)) + "\n")
    image_py = str(image / "bin" / "python")
    # run from tmp_path: from the repository root, `import mtu_dist` would find the source folder
    assert subprocess.run([image_py, "-c", "import mtu_dist"], capture_output=True, cwd=tmp_path).returncode != 0

    report = tmp_path / "report.json"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            image_py,
            "install",
            "--dry-run",
            "--quiet",
            "--no-index",
            "--find-links",
            str(wheels),
            "--report",
            str(report),
            "mtu_dist",
        ],
        check=True,
        env=env,
    )
    planned = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    assert planned == ["mtu_dist"], planned

    overlay = tmp_path / "overlay"
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "offline" / "install.sh"), "--venv", str(overlay), str(wheels)],
        capture_output=True,
        text=True,
        env={**env, "PYTHON": image_py},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unchanged" in proc.stdout
    check = subprocess.run(
        [
            str(overlay / "bin" / "python"),
            "-c",
            "import mtu_dist, torch, pathlib; print(torch.__version__); "
            "print(pathlib.Path(mtu_dist.__file__).resolve())",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.split()
    import torch

    assert check[0] == torch.__version__
    assert str(overlay) in check[1], "mtu_dist must be installed in the overlay, not found elsewhere"
    assert not list(overlay.rglob("torch-*.dist-info")), "torch must not be installed into the overlay"


def test_offline_install_names_a_missing_folder(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "offline" / "install.sh"), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "no such folder" in proc.stderr and "Traceback" not in proc.stderr


def test_deepspeed_launch_without_the_extra_says_what_to_install(monkeypatch):
    """The DeepSpeed path when the `deepspeed` extra is not installed: one line naming what is missing and
    the install command, before Accelerate fails deep inside its plugin."""
    import importlib.util

    from mtu_dist.distributed import runtime
    from mtu_dist.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(
        UserError, match=r"deepspeed is not installed: pip install -c constraints.txt -e '\.\[deepspeed\]'"
    ):
        runtime.make_accelerator()
