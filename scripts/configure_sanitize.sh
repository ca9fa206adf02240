#!/usr/bin/env bash
# Configures a sanitizer build with clang 14 (scripts/sanitize.sh, scripts/fuzz.sh):
#   scripts/configure_sanitize.sh <build dir> <sanitizers, as -fsanitize= takes them> [cmake args...]
# CXX_SAN overrides the compiler (default clang++-14); ccache is used when installed.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1 sanitizers=$2
shift 2
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
# Without MPI (DEVPIPE_MPI=OFF) unless the caller passes -DDEVPIPE_MPI=ON (later arguments win):
# the ASan+UBSan build does (scripts/sanitize.sh runs test_mpi's mpirun jobs under it, Open MPI's
# own leaks suppressed by scripts/lsan_openmpi.supp); the TSan build does not (test_mpi skips
# there).
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDEVPIPE_TESTS=ON -DDEVPIPE_MPI=OFF \
  -DCMAKE_CXX_COMPILER="${CXX_SAN:-clang++-14}" -DDEVPIPE_SANITIZE="$sanitizers" "${launcher[@]}" "$@" >/dev/null
