#!/usr/bin/env bash
# A throwaway environment holding SGLang's own argument parser (sglang.srt.server_args.ServerArgs),
# for tests/test_plan_matrix.py to parse every SGLang command dsr1 generates with it. SGLang serves
# on GPUs only, so `dsr1 engine install sglang` is not for this machine; its parser needs no GPU:
# the sglang wheel without its dependencies, torch's CPU build and what `import
# sglang.srt.server_args` reaches (found by importing until it worked). ~40 s, 1.2 GB.
#
#   bash scripts/sglang_parser.sh DIR     # DIR/bin/python then imports sglang.srt.server_args
set -euo pipefail
dest="${1:?usage: scripts/sglang_parser.sh DIR}"
# (version read from the distribution: importing sglang wants triton, which the test stubs)
version() { "$dest/bin/python" -c "import importlib.metadata as m; print(m.version('sglang'))" 2>/dev/null; }
if [ -x "$dest/bin/python" ] && [ "$(version)" = 0.5.23 ]; then
  echo "sglang parser: sglang 0.5.23 already in $dest"
  exit 0
fi
rm -rf "$dest"
"${PYTHON:-python3}" -m venv "$dest"
# torch==2.13.0 resolves to the CPU build here (never a CUDA one); the rest are import-time needs
"$dest/bin/pip" install -q --disable-pip-version-check --no-deps sglang==0.5.23 torch==2.13.0 numpy orjson psutil pybase64 requests urllib3 \
  idna certifi charset-normalizer typing_extensions packaging pillow starlette anyio msgspec pydantic \
  pydantic_core annotated-types typing_inspection pyzmq tqdm IPython traitlets pygments aiohttp multidict attrs \
  yarl propcache aiohappyeyeballs aiosignal frozenlist
echo "sglang parser: sglang $(version) in $dest, made in ${SECONDS}s"
