#!/usr/bin/env bash
# Installs the ONNX Runtime peer of `devpipe bench`: npm onnxruntime-node (CPU binaries ship in
# the package; --ignore-scripts keeps its install script from fetching GPU binaries) into a
# cache folder, by default build/bench/ort (node_modules there). Usage:
#   bash bench/ort/install.sh [DEST]
# Exit 0 when onnxruntime-node loads from DEST afterwards; non-zero with a message otherwise.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/../../build/bench/ort}"
version=1.30.0
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
cp "$here/package.json" "$dest/package.json"
if ! command -v npm >/dev/null 2>&1; then
  echo "install.sh: npm not found (Debian package npm)" >&2
  exit 3
fi
if [ -f "$dest/node_modules/onnxruntime-node/package.json" ] &&
   grep -q "\"version\": \"$version\"" "$dest/node_modules/onnxruntime-node/package.json"; then
  :
else
  (cd "$dest" && npm install --ignore-scripts --no-audit --no-fund --loglevel=error \
      "onnxruntime-node@$version" >&2)
fi
node -e "require('$dest/node_modules/onnxruntime-node'); " >&2 || {
  echo "install.sh: onnxruntime-node@$version installed in $dest but does not load" >&2
  exit 4
}
echo "$dest"
