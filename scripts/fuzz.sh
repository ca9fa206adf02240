#!/usr/bin/env bash
# make fuzz: builds the libFuzzer harnesses of fuzz/ (in build-asan, the ASan + UBSan build of
# `make sanitize`), writes their seed corpora with devpipe's own writers (fuzz_seeds), then runs
# each fuzzer for FUZZ_SECONDS (default 300), one after the other.
#
#   build-asan/fuzz/seeds/<corpus>/    the seeds, written anew on every run
#   build-asan/fuzz/corpus/<fuzzer>/   what the fuzzer found interesting (kept between runs)
#   build-asan/fuzz/crashes/<fuzzer>-* inputs that crashed, leaked, timed out or ran out of memory;
#                                      reproduce with build-asan/fuzz/<fuzzer> <file>
#   fuzz/*.dict                        libFuzzer dictionaries (JSON keys, op names, edge numbers)
# Exits non-zero when any fuzzer found something. FUZZERS selects some (default: all three),
# FUZZ_TIMEOUT is the seconds one input may take (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}
FUZZ_SECONDS=${FUZZ_SECONDS:-300}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-10}
FUZZERS=${FUZZERS:-"fuzz_safetensors fuzz_artifact fuzz_config"}
bash scripts/configure_sanitize.sh build-asan address,undefined -DDEVPIPE_FUZZ=ON
# shellcheck disable=SC2086
cmake --build build-asan -j "$JOBS" --target fuzz_seeds $FUZZERS
out=build-asan/fuzz
rm -rf "$out/seeds"
"$out/fuzz_seeds" "$out/seeds"
failed=()
for f in $FUZZERS; do
  corpus=${f#fuzz_}
  dict=fuzz/json.dict
  [ "$f" = fuzz_safetensors ] && dict=fuzz/safetensors.dict
  mkdir -p "$out/corpus/$f" "$out/crashes"
  echo "fuzz: $f for ${FUZZ_SECONDS}s (seeds: $out/seeds/$corpus)"
  log="$out/$f.log"
  code=0
  "$out/$f" -max_total_time="$FUZZ_SECONDS" -timeout="$FUZZ_TIMEOUT" -rss_limit_mb=3072 \
    -print_final_stats=1 -dict="$dict" -artifact_prefix="$out/crashes/$f-" "$out/corpus/$f" "$out/seeds/$corpus" \
    >"$log" 2>&1 || code=$?
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  if [ "$code" -ne 0 ]; then
    failed+=("$f")
    echo "fuzz: $f FOUND A PROBLEM (exit $code) after $execs inputs; log $log:"
    grep -E -A30 "ERROR|==[0-9]+==|runtime error|escaped|deadly signal|Test unit written" "$log" | head -60
  else
    echo "fuzz: $f clean: $execs inputs in ${FUZZ_SECONDS}s, corpus $(ls "$out/corpus/$f" | wc -l) files"
  fi
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz: findings in ${failed[*]} (inputs under $out/crashes)"
  exit 1
fi
echo "fuzz: all clean"
