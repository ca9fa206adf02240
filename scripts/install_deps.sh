#!/usr/bin/env bash
# Installs the Debian 12 packages devpipe needs, if any is missing.
#   scripts/install_deps.sh demo   what building the library, the CLI and the demo needs
#   scripts/install_deps.sh        (or `test`) that, plus the test suites' GoogleTest, the
#                                  PyTorch the reference tests run, and Open MPI (the
#                                  multi-process mode: libopenmpi-dev to build it, mpirun to run)
#   scripts/install_deps.sh sanitize   `test`, plus clang 14 with its sanitizer and libFuzzer
#                                  runtimes, LLVM's OpenMP (libomp, and its TSan support
#                                  libarcher) and llvm-symbolizer: `make sanitize`, `make fuzz`
# ocl-icd-opencl-dev: Debian's libdnnl-dev is built with oneDNN's OpenCL runtime, so its CMake
# config looks for OpenCL; the package is only a "Recommends" of libdnnl-dev, and we install
# with --no-install-recommends.
set -euo pipefail
profile=${1:-test}
pkgs=(build-essential cmake ninja-build pkg-config libdnnl-dev ocl-icd-opencl-dev nlohmann-json3-dev)
case "$profile" in
  demo) ;;
  test) pkgs+=(libgtest-dev python3-torch python3-numpy libopenmpi-dev openmpi-bin) ;;
  sanitize) pkgs+=(libgtest-dev python3-torch python3-numpy libopenmpi-dev openmpi-bin clang-14 libclang-rt-14-dev libomp-14-dev llvm-14) ;;
  *) echo "install_deps.sh: unknown profile '$profile' (expected demo, test or sanitize)" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "deps ($profile): all installed"
  exit 0
fi
echo "deps ($profile): installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "deps ($profile): done"
