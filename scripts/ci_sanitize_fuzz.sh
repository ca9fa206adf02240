#!/usr/bin/env bash
# CI: `make sanitize`, then each fuzzer for 60 s from seeds written at test time (`make fuzz`
# with FUZZ_SECONDS=60). Prints the time each part took.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
make sanitize
t_sanitize=$SECONDS
FUZZ_SECONDS=${FUZZ_SECONDS:-60} make fuzz
echo "ci_sanitize_fuzz: make sanitize ${t_sanitize}s, make fuzz $((SECONDS - t_sanitize))s, total ${SECONDS}s"
