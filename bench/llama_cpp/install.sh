#!/usr/bin/env bash
# Installs the llama.cpp peer of `devpipe bench --workload llm`: node-llama-cpp 3.21.1 with its
# prebuilt linux-x64 binaries (no build from source, no download at run time) into
# ${DEVPIPE_LLAMA_CPP_DIR:-build/llama_cpp} (default: build/llama_cpp under the repository).
# Usage: bash bench/llama_cpp/install.sh [DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="${1:-${DEVPIPE_LLAMA_CPP_DIR:-$repo/build/llama_cpp}}"
mkdir -p "$dir"
cp "$here/package.json" "$dir/package.json"
[ -f "$here/package-lock.json" ] && cp "$here/package-lock.json" "$dir/package-lock.json"
cd "$dir"
if [ -d node_modules/node-llama-cpp ] && [ -d node_modules/@node-llama-cpp/linux-x64 ]; then
  echo "llama_cpp peer already installed in $dir"
  exit 0
fi
command -v npm >/dev/null || { echo "install.sh: npm not found (apt-get install npm)" >&2; exit 1; }
npm i -E --ignore-scripts --omit=optional --no-audit --no-fund \
  node-llama-cpp@3.21.1 @node-llama-cpp/linux-x64@3.21.1
echo "llama_cpp peer installed in $dir"
