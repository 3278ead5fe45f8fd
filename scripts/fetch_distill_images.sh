#!/usr/bin/env bash
# The offline photos distillation learns from: Debian packages of desktop wallpapers and Tux Paint's stamp photos,
# unpacked without root (apt-get download + dpkg-deb -x) into DEST/<package>/, raster images only, with each
# package's copyright file beside them (DEST/<package>/copyright). Nothing of it is shipped: the weights are.
#   usage: scripts/fetch_distill_images.sh [DEST]    (DEST default data/distill-images)
# Cached: a package whose folder is complete (DEST/<package>/.done) is not fetched again.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/data/distill-images}
PACKAGES=(gnome-backgrounds mate-backgrounds tuxpaint-stamps-default)
mkdir -p "$DEST"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for pkg in "${PACKAGES[@]}"; do
  [ -f "$DEST/$pkg/.done" ] && continue
  if ! (cd "$work" && apt-get download "$pkg" >/dev/null 2>&1); then
    (apt-get update >/dev/null 2>&1 || true)  # a fresh machine has no package lists yet
    (cd "$work" && apt-get download "$pkg" >/dev/null) || { echo "error: cannot download Debian package $pkg" >&2; exit 1; }
  fi
  rm -rf "$work/x" "$DEST/$pkg"
  dpkg-deb -x "$work/${pkg}"_*.deb "$work/x"
  mkdir -p "$DEST/$pkg"
  # keep the folder structure below usr/share (names are what the held-out split hashes)
  (cd "$work/x/usr/share" && find . -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' -o -iname '*.webp' \) \
      ! -path './doc/*' -print0 | xargs -0 -I{} cp --parents {} "$DEST/$pkg/")
  cp "$work/x/usr/share/doc/$pkg/copyright" "$DEST/$pkg/copyright"
  touch "$DEST/$pkg/.done"
  rm -f "$work/${pkg}"_*.deb
  echo "$pkg: $(find "$DEST/$pkg" -type f ! -name copyright ! -name .done | wc -l) images"
done
