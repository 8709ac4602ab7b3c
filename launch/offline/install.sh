#!/usr/bin/env bash
# Install mtu_dist on an air-gapped GPU node from a wheel folder made by launch/offline/gather_wheels.py,
# with the package index switched off and the image's own torch stack left exactly as it is.
#
#   launch/offline/install.sh WHEELS                    # into the environment of $PYTHON (default python3)
#   launch/offline/install.sh --venv DIR WHEELS         # into a new venv DIR layered over $PYTHON's packages
#                                                       # (the image stays untouched; use DIR/bin/python)
#   launch/offline/install.sh --venv DIR WHEELS --run [ARGS]   # then bench/gpu.sh ARGS with that Python
#
# It fails (exit 1) if the install changed torch's version, so "beside the cluster's torch" is checked,
# not assumed. Needs pip >= 22.3 in $PYTHON (for --python).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
VENV=""
if [ "${1:-}" = "--venv" ]; then VENV=$2; shift 2; fi
WHEELS=${1:?usage: launch/offline/install.sh [--venv DIR] WHEELS [--run [gpu.sh args]]}
shift
[ -d "$WHEELS" ] || { echo "install.sh: $WHEELS: no such folder (make it with launch/offline/gather_wheels.py)" >&2; exit 2; }
ls "$WHEELS"/mtu_dist-*.whl >/dev/null 2>&1 || { echo "install.sh: $WHEELS holds no mtu_dist wheel" >&2; exit 2; }

torch_version() { "$1" -c 'import torch; print(torch.__version__)'; }
before=$(torch_version "$PY")
TARGET_PY=$PY
if [ -n "$VENV" ]; then
  # a venv without pip whose site-packages points (.pth) at the image's: the image's packages count as
  # installed, and only what it lacks lands in DIR
  "$PY" -m venv --without-pip "$VENV"
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # every package folder on the image's path (site-packages and what its .pth files add), not the stdlib
  "$PY" -c 'import os, sys, sysconfig
std = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
def pkgs(p):
    r = os.path.realpath(p)
    return "-packages" in r or (r not in std and not r.startswith(tuple(s + os.sep for s in std)))
print("\n".join(p for p in sys.path if p and os.path.isdir(p) and pkgs(p)))' > "$site/image-packages.pth"
  TARGET_PY=$VENV/bin/python
fi
PIP_NO_INDEX=1 "$PY" -m pip --python "$TARGET_PY" install --no-index --find-links "$WHEELS" \
  --upgrade-strategy only-if-needed --disable-pip-version-check --no-warn-script-location \
  "mtu_dist${MTU_EXTRAS:+[$MTU_EXTRAS]}" 
after=$(torch_version "$TARGET_PY")
if [ "$before" != "$after" ]; then
  echo "install.sh: torch changed from $before to $after: the install must not replace the image's torch" >&2
  exit 1
fi
echo "install.sh: mtu_dist installed for $TARGET_PY beside torch $after (unchanged)"
if [ "${1:-}" = "--run" ]; then
  shift
  PYTHON=$TARGET_PY exec bench/gpu.sh "$@"
fi
