#!/usr/bin/env bash
# Install learn2learn 0.2.0 into the active Python on 3.11+.
# Its sdist ships Cython-generated C files that include <longintrepr.h>, which Python 3.11 moved
# (learnables/learn2learn#413), so we delete them and let Cython < 3 regenerate them.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-python}
# Absolute path to the (venv) interpreter, without resolving the venv symlink: we cd away below.
PY=$("$PY" -c "import sys; print(sys.executable)")
if "$PY" -c "import importlib.metadata as m; m.version('learn2learn')" >/dev/null 2>&1; then
  echo "learn2learn already installed"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip install -q "cython<3" setuptools wheel
# --no-build-isolation: preparing metadata then uses the cython<3 above instead of building Cython from source.
"$PY" -m pip download -q --no-deps --no-build-isolation --no-binary learn2learn -d "$work" learn2learn==0.2.0
tar -xzf "$work"/learn2learn-0.2.0.tar.gz -C "$work"
cd "$work"/learn2learn-0.2.0
rm -f learn2learn/data/*.c
# gsutil and qpth are declared but unused by learn2learn.data / .algorithms, and qpth 0.0.x no longer builds
# (invalid 'numpy>=1<2' specifier); drop them so pip's resolver does not chase them later.
sed -i -e "/'gsutil',/d" -e "/'qpth>=/d" setup.py
# setup.py only re-cythonizes when build_ext is named on the command line.
# Compiler chatter goes to a log that is shown only if the build fails.
if ! "$PY" setup.py -q build_ext bdist_wheel >"$work/build.log" 2>&1; then
  cat "$work/build.log" >&2; echo "learn2learn build failed (log above)" >&2; exit 1
fi
# Import-time needs of learn2learn.
"$PY" -m pip install -q -c "$ROOT/constraints.txt" gym scipy requests tqdm
"$PY" -m pip install -q --no-deps dist/*.whl
