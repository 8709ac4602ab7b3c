#!/usr/bin/env python3
"""Gather, on a machine with package-index access, the wheels an air-gapped GPU image lacks.

The target keeps its own torch stack: the project's dependencies are resolved *against the target's
installed versions* (its `pip freeze`, given as a file), and only what the target does not already
have is downloaded, for the target's Python and platform. The project itself travels as a wheel too.
On the target, `launch/offline/install.sh FOLDER` installs from the folder with the index switched off.

    # on the GPU node (no network needed):   python3 -m pip freeze > image-freeze.txt
    python3 launch/offline/gather_wheels.py --target-freeze image-freeze.txt --out wheels/
    python3 launch/offline/gather_wheels.py --python-version 3.12 --platform manylinux_2_28_x86_64 ...

Defaults: CPython 3.12, manylinux x86-64, the freeze of a common CUDA image (Python 3.12.3, torch
2.11.0, torchvision 0.26.0, accelerate 1.15.0, transformers 5.17.0) in launch/offline/gpu-image-freeze.txt.
The project's own dependencies the target lacks are pinned by constraints.txt, so both machines run the
same mlflow, webdataset, pydantic, ...; their own dependencies are resolved to fit the target. Stdlib
only; it needs pip >= 24 (older pips check Requires-Python against the running interpreter, not the target).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FREEZE = ROOT / "launch" / "offline" / "gpu-image-freeze.txt"
# manylinux tags pip must match exactly; the newer ones cover wheels built on recent toolchains
DEFAULT_PLATFORMS = [
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_35_x86_64",
    "manylinux_2_39_x86_64",
    "linux_x86_64",
]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


class GatherError(Exception):
    """A problem the user can fix; printed as one line."""


def normalize(name: str) -> str:
    """PEP 503 name normalisation: `PyYAML`, `pyyaml` and `py_yaml` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a freeze or constraints file; editable/URL/comment lines are skipped."""
    if not path.is_file():
        raise GatherError(f"{path}: no such file (expected the output of `pip freeze` on the target)")
    pins = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line.strip())
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    if not pins:
        raise GatherError(f"{path}: no `name==version` line found (expected the output of `pip freeze`)")
    return pins


# what the target's image owns: never replaced, whatever a dependency asks for
PROTECTED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*)$")


def to_fetch(report: dict, installed: dict[str, str]) -> list[tuple[str, str]]:
    """(name, version) of every package a pip install report would add or change on the target.

    Packages the target has at a satisfying version are not in the report at all (the resolution ran
    against the target's installed set); one it would replace is fetched too (a newer certifi, say),
    unless it belongs to the target's torch stack: then the project cannot live beside that image.
    """
    fetch = []
    for item in report["install"]:
        name, version = normalize(item["metadata"]["name"]), item["metadata"]["version"]
        if name in installed and PROTECTED.match(name):
            raise GatherError(
                f"the dependencies ask for {name}=={version} but the target's image has "
                f"{installed[name]}: the project's ranges must admit the image's torch stack"
            )
        fetch.append((name, version))
    return sorted(fetch)


def direct_dependencies() -> set[str]:
    """Names the project itself requires (every extra included), from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [
        r for extra in project.get("optional-dependencies", {}).values() for r in extra
    ]
    return {normalize(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in reqs}


def lock_constraints(target: dict[str, str], lock: dict[str, str], direct: set[str]) -> str:
    """The lock's versions of the project's own dependencies that the target lacks.

    Their dependencies are left free: the lock chose those against its own torch stack, and they can
    clash with the target's (a newer certifi, say).
    """
    return "".join(f"{k}=={v}\n" for k, v in sorted(lock.items()) if k in direct and k not in target)


def stub_environment(root: Path, target: dict[str, str]) -> Path:
    """An empty interpreter environment that *looks* like the target: a venv without pip whose path
    holds one metadata-only dist-info per target package. pip resolves against it as if on the target,
    so what the target has (torch first of all) is taken as installed and never resolved again."""
    import venv

    venv.create(root / "venv", with_pip=False)
    stubs = root / "stubs"
    for name, version in target.items():
        info = stubs / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return stubs


def pip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise GatherError(f"pip {args[0]} failed: {' | '.join(tail)}")
    return proc


def platform_args(args) -> list[str]:
    out = ["--only-binary=:all:", "--python-version", args.python_version, "--implementation", "cp"]
    for plat in args.platform or DEFAULT_PLATFORMS:
        out += ["--platform", plat]
    return out


def gather(args) -> list[tuple[str, str]]:
    out = Path(args.out).resolve()  # a file URI for the project wheel needs an absolute path
    out.mkdir(parents=True, exist_ok=True)
    target = read_pins(Path(args.target_freeze))
    lock = read_pins(Path(args.lock)) if args.lock else {}
    pip("wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT))
    project_wheel = max(out.glob("mtu_dist-*.whl"), key=lambda p: p.stat().st_mtime)
    extras = f"[{args.extras}]" if args.extras else ""
    with tempfile.TemporaryDirectory() as tmp:
        stubs = stub_environment(Path(tmp), target)
        cons = Path(tmp) / "constraints.txt"
        cons.write_text(lock_constraints(target, lock, direct_dependencies()))
        report = Path(tmp) / "report.json"
        pip(
            "--python",
            str(Path(tmp) / "venv" / "bin" / "python"),
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            "-c",
            str(cons),
            *platform_args(args),
            f"mtu_dist{extras} @ {project_wheel.as_uri()}",
            env={**os.environ, "PYTHONPATH": str(stubs)},
        )
        need = [(n, v) for n, v in to_fetch(json.loads(report.read_text()), target) if n != "mtu-dist"]
    if need:
        pip("download", "--no-deps", "--quiet", "-d", str(out), *platform_args(args), *[f"{n}=={v}" for n, v in need])
    (out / "gathered.json").write_text(
        json.dumps(
            {
                "python_version": args.python_version,
                "platforms": args.platform or DEFAULT_PLATFORMS,
                "target_freeze": str(args.target_freeze),
                "extras": args.extras,
                "project_wheel": project_wheel.name,
                "packages": [f"{n}=={v}" for n, v in need],
            },
            indent=1,
        )
        + "\n"
    )
    return need


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--target-freeze", default=str(DEFAULT_FREEZE), help="`pip freeze` output of the target image")
    ap.add_argument("--python-version", default="3.12", help="the target's Python (major.minor)")
    ap.add_argument(
        "--platform",
        action="append",
        help="a wheel platform tag of the target (repeatable; default: the manylinux x86-64 tags)",
    )
    ap.add_argument(
        "--extras",
        default="",
        help="project extras to include, e.g. 'deepspeed' (source-only "
        "packages cannot be fetched for another platform: build their wheels with `pip wheel`)",
    )
    ap.add_argument(
        "--lock",
        default=str(ROOT / "constraints.txt"),
        help="exact pins for packages the target lacks ('' for the newest that fit)",
    )
    ap.add_argument("--out", default="wheels", help="folder to fill (created; carry it to the target)")
    args = ap.parse_args(argv)
    try:
        need = gather(args)
    except GatherError as e:
        print(f"gather_wheels: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in Path(args.out).glob("*.whl")) / 2**20
    print(
        f"gather_wheels: {len(need)} package(s) the target lacks + the project wheel in {args.out} "
        f"({size:.1f} MiB); on the target: launch/offline/install.sh {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
