#!/usr/bin/env bash
# Fetch timm's own tests/test_models.py for the installed timm, from timm's sdist on PyPI, into DEST/VERSION/.
# tests/test_timm_contract.py runs it against our models (and skips, saying why, where it is absent).
#   usage: scripts/fetch_timm_tests.sh [PY] [DEST]    (PY: the venv's python; DEST default .venv/timm-tests)
# Cached: does nothing when DEST/VERSION/test_models.py is already there.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-$ROOT/.venv/bin/python}
DEST=${2:-$ROOT/.venv/timm-tests}
VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('timm'))")
OUT="$DEST/$VERSION"
if [ -f "$OUT/test_models.py" ]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "timm==$VERSION"
tar -xzf "$work/timm-$VERSION.tar.gz" -C "$work" "timm-$VERSION/tests"
src="$work/timm-$VERSION/tests"
# Helper modules test_models.py imports by plain name from its own tests/ folder come along (timm 1.0.31 has none).
helpers=()
for f in "$src"/*.py; do
  name=$(basename "$f" .py)
  case "$name" in test_*|conftest|__init__) continue ;; esac
  if grep -Eq "^\s*(from|import)\s+$name\b" "$src/test_models.py"; then
    helpers+=("$f")
  fi
done
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
cp "$src/test_models.py" "${helpers[@]}" "$OUT.tmp/"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"  # whole or not at all: an interrupted fetch leaves no half-filled cache
echo "timm $VERSION tests/test_models.py -> $OUT${helpers:+ (with ${#helpers[@]} helper files)}"
