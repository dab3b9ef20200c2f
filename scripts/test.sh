#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv, then run the whole suite with pytest.
# With DSR1_TEST_ENGINES=1 it first installs the real engines the engine tests drive (vLLM's CPU
# build, llama.cpp's llama-server; scripts/engines.sh, kept in .cache/engines-home between runs);
# DSR1_TEST_ENGINES_HOME=DIR uses engines installed there. Without either, those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
bash scripts/setup.sh
echo "test.sh: setup took $((SECONDS - t0))s"
if [ "${DSR1_TEST_ENGINES:-0}" = 1 ]; then
  t1=$SECONDS
  export DSR1_TEST_ENGINES_HOME="${DSR1_TEST_ENGINES_HOME:-$PWD/.cache/engines-home}"
  bash scripts/engines.sh
  echo "test.sh: engines took $((SECONDS - t1))s"
fi
# -rs: every skip says why (an engine test that cannot find its engine fails instead, with DSR1_TEST_ENGINES_HOME)
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
