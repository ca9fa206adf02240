#!/usr/bin/env bash
# Checks devpipe as another project uses it: installs it (cmake --install) to a temporary
# prefix, then builds tests/consumer against that prefix twice and runs both programs:
#   1. CMake:      find_package(devpipe) + target_link_libraries(... devpipe::devpipe)
#   2. pkg-config: c++ main.cpp $(pkg-config --cflags --libs --static devpipe)
# Every installed header is also compiled on its own (self-contained, no private includes).
#
#   scripts/check_consumer.sh [BUILD_DIR]
#
# BUILD_DIR (default: build) is configured if it is not yet (Release, tests off) and the
# library and the devpipe program are built there; an existing build (make test's) is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
build=${1:-build}
jobs=${JOBS:-$(nproc)}

if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEVPIPE_TESTS=OFF >/dev/null
fi
cmake --build "$build" -j "$jobs" --target devpipe devpipe_cli
cxx=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")
cxx=${cxx:-c++}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/devpipe_consumer.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix="$tmp/prefix"
cmake --install "$build" --prefix "$prefix" >"$tmp/install.log"
echo "check_consumer: installed to a temporary prefix: $(cd "$prefix" && find . -type f | sort | tr '\n' ' ')"
[ -x "$prefix/bin/devpipe" ] || { echo "check_consumer: bin/devpipe was not installed" >&2; exit 1; }

# Each public header on its own.
for h in "$prefix"/include/devpipe/*.h; do
  echo "#include <devpipe/$(basename "$h")>" | "$cxx" -std=c++20 -fsyntax-only -x c++ -I"$prefix/include" - ||
    { echo "check_consumer: installed header $(basename "$h") does not compile on its own" >&2; exit 1; }
done
echo "check_consumer: $(ls "$prefix"/include/devpipe/*.h | wc -l) installed headers compile on their own"

# 1. find_package(devpipe)
cmake -S tests/consumer -B "$tmp/cmake-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_PREFIX_PATH="$prefix" >"$tmp/cmake-configure.log" ||
  { cat "$tmp/cmake-configure.log" >&2; exit 1; }
cmake --build "$tmp/cmake-build" >/dev/null || { cmake --build "$tmp/cmake-build" >&2; exit 1; }
echo -n "check_consumer: find_package: "
"$tmp/cmake-build/devpipe_consumer" "$tmp/work-cmake"

# 2. pkg-config (the .pc file finds its prefix from where it lies)
pc_dir=$(dirname "$(find "$prefix" -name devpipe.pc | head -1)")
export PKG_CONFIG_PATH="$pc_dir"
flags=$(pkg-config --cflags --libs --static devpipe)
echo "check_consumer: pkg-config --cflags --libs --static devpipe: $flags"
# shellcheck disable=SC2086  # the flags are words
"$cxx" -std=c++20 -O2 tests/consumer/main.cpp -o "$tmp/pkgconfig-consumer" $flags
echo -n "check_consumer: pkg-config: "
"$tmp/pkgconfig-consumer" "$tmp/work-pkgconfig"

echo "check_consumer: ok after ${SECONDS}s"
