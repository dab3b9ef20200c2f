"""Importing GGUF files that carry R1's real tokenizer, and serving them.

The Qwen case is a 1-layer model around the real DeepSeek-R1-Distill-Qwen-7B GGUF's
metadata (tests/gguf_util.py): its 152,064 tokens, types, merges, special ids and
chat template, verbatim. transformers 5.24 drops its control tokens (`<｜User｜>` as
5 pieces, BOS/EOS appended at 152065/152066 past the embedding), so before the
repair in dsr1/gguf_tokenizer.py every chat request failed with IndexError. The
Llama case is R1-Distill-Llama-8B's special-token layout over the demo model's
vocabulary (no R1-Llama GGUF is on PyPI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from dsr1 import gguf_meta, gguf_tokenizer
from dsr1.errors import IntegrityError
from tests.conftest import CACHE
from tests.gguf_util import build_tiny_gguf, r1_llama_scheme_metadata, r1_qwen_metadata
from tests.serve_util import REPO, ServerProc

pytestmark = pytest.mark.slow
MSGS = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?  Answer in one line,\n café ok 🙂 12345"},
        {"role": "assistant", "content": "<think>\nsimple</think>\n\n4"},
        {"role": "user", "content": "And 3*3?"}]
# llama.cpp's own reading of the two tiny files (built by the fixtures below; the tokenizer metadata is
# all that matters here), recorded with `llama-tokenize -m tiny-r1-KIND.gguf -p PROMPT --ids --no-bos
# --log-disable`, llama.cpp as vendored in llama-cpp-python 0.3.36 built from its sdist. PROMPT is the
# file's chat template rendered for MSGS (it starts with BOS itself; llama.cpp parses special tokens in
# the prompt by default). Before dsr1's repair, transformers gave 52 ids for the Qwen prompt.
LLAMA_CPP_IDS = {
    "qwen": [151646, 3430, 9814, 13, 151644, 3838, 374, 220, 17, 10, 17, 30, 220, 21806, 304, 825, 1555, 345, 51950, 5394, 27484, 220, 16, 17, 18, 19, 20, 151645, 271, 19, 151643, 151644, 3036, 220, 18, 9, 18, 30, 151645],
    "llama": [49152, 6077, 5453, 30, 49163, 1780, 314, 216, 34, 27, 34, 47, 216, 19842, 281, 582, 1761, 28, 198, 37366, 10907, 47526, 216, 33, 34, 35, 36, 37, 49164, 1116, 36, 49153, 49163, 3528, 216, 35, 26, 35, 47, 49164],
}


@pytest.fixture(scope="module")
def r1_qwen_meta():
    return r1_qwen_metadata(CACHE)


@pytest.fixture(scope="module")
def ggufs(r1_qwen_meta, demo_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("r1-gguf")
    return {"qwen": build_tiny_gguf(r1_qwen_meta, d / "tiny-r1-qwen.gguf"),
            "llama": build_tiny_gguf(r1_llama_scheme_metadata(demo_gguf, r1_qwen_meta), d / "tiny-r1-llama.gguf")}


def _pull(home: Path, *args: str) -> subprocess.CompletedProcess:
    return _dsr1(home, "pull", *args)


def _dsr1(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "dsr1", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def stored(ggufs, tmp_path_factory):
    """Both files imported with `dsr1 pull FILE.gguf` into one store."""
    home = tmp_path_factory.mktemp("home")
    out = {}
    for kind, path in ggufs.items():
        r = _pull(home, str(path), "--name", f"r1-{kind}", "--quant", "none", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        out[kind] = json.loads(r.stdout)
    return home, out


def _file_text(table: gguf_tokenizer.TokenTable, ids: list[int]) -> str:
    """Text of ids read through the GGUF's own token table (byte-level spelling undone, as llama.cpp does)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    unbyte = {c: b for b, c in bytes_to_unicode().items()}
    out = bytearray()
    for i in ids:
        piece = table.tokens[i]
        if table.types[i] == gguf_tokenizer.NORMAL:
            out += bytes(unbyte[c] for c in piece)
        else:
            out += piece.encode()
    return out.decode("utf-8")


@pytest.mark.parametrize("kind", ["qwen", "llama"])
def test_import_keeps_the_files_token_ids(stored, ggufs, kind):
    from transformers import AutoTokenizer

    home, results = stored
    table = gguf_tokenizer.TokenTable.from_header(gguf_meta.read(ggufs[kind]))
    tok = AutoTokenizer.from_pretrained(Path(results[kind]["embedded_dir"]))
    # every control / user-defined token is its one id; BOS, EOS, PAD are the file's; nothing past the table
    assert gguf_tokenizer.check(tok, table, len(table.tokens)) == []
    assert len(tok) == len(table.tokens)
    assert tok.chat_template == table.chat_template
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(tok, f"{name}_id") == table.special_ids[name]
    # the rendered prompt: its ids are the file's tokens for exactly that text, markers whole
    text = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    assert _file_text(table, ids) == text
    marks = {t: i for i, t, _ in table.added()}
    assert ids[0] == table.special_ids["bos_token"] and ids[-1] == marks["<｜Assistant｜>"]
    assert ids.count(marks["<｜User｜>"]) == 2 and ids.count(marks["<｜Assistant｜>"]) == 2
    assert ids.count(table.special_ids["eos_token"]) == 1  # closing the earlier assistant turn
    # the GGUF says add BOS: plain text gets the file's BOS, once
    assert tok("hi").input_ids[0] == table.special_ids["bos_token"]
    checks = results[kind]["checks"]
    assert checks["tokenizer_tokens_checked"] == len(table.added()) and checks["tokenizer_repairs"]


@pytest.mark.parametrize("kind", ["qwen", "llama"])
def test_prompt_ids_match_llama_cpp(stored, kind):
    from transformers import AutoTokenizer

    home, results = stored
    tok = AutoTokenizer.from_pretrained(Path(results[kind]["embedded_dir"]))
    text = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    assert tok(text, add_special_tokens=False).input_ids == LLAMA_CPP_IDS[kind]


def test_imported_r1_gguf_answers_chat(stored):
    home, results = stored
    srv = ServerProc(["r1-qwen", "--dtype", "fp32", "--threads", "1", "--max-model-len", "512"], home)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="r1-qwen", messages=MSGS, max_tokens=6, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(Path(results["qwen"]["embedded_dir"]))
        text = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
        assert r.usage.prompt_tokens == len(tok(text, add_special_tokens=False).input_ids)
        streamed = list(client.chat.completions.create(model="r1-qwen", messages=MSGS, max_tokens=6, temperature=0,
                                                        stream=True))
        assert streamed[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        assert srv.stop() == 0, "".join(srv.lines[-30:])
    assert not any("IndexError" in line for line in srv.lines)


def test_inconsistent_token_table_is_refused(r1_qwen_meta, tmp_path):
    """A table that names one control text at two ids cannot be matched: refused, nothing stored."""
    from gguf import GGUFValueType as T

    meta = dict(r1_qwen_meta)
    tokens = list(meta["tokenizer.ggml.tokens"].value)
    tokens[151647] = "<｜User｜>"  # also at 151644, both control
    meta["tokenizer.ggml.tokens"] = gguf_meta.Field(T.ARRAY, tokens, T.STRING)
    bad = build_tiny_gguf(meta, tmp_path / "bad.gguf")
    home = tmp_path / "home"
    r = _pull(home, str(bad), "--name", "bad", "--quant", "none")
    assert r.returncode == IntegrityError.exit_code, r.stderr[-2000:]
    assert "token table" in r.stderr and "<｜User｜>" in r.stderr
    assert not (home / "models" / "bad" / "manifest.json").exists()
    assert not list((home / "models").glob("bad/model/*"))


def test_imported_scripted_r1_gguf_writes_its_script(r1_qwen_meta, tmp_path):
    """A GGUF whose greedy output is a fixed token script (tests/gguf_util.build_tiny_gguf(script=)),
    imported and served by the embedded engine, writes exactly that script: the rendered prompt must
    end in the file's `<｜Assistant｜>` id for it to start at all, and the output detokenizes to R1's
    answer split into reasoning and content. llama-server reads the same file to the same answer
    (tests/test_serve_engines.py::test_llamacpp_r1_reasoning_reaches_both_fields)."""
    from tests.test_serve_engines import R1_SCRIPT

    gguf = build_tiny_gguf(r1_qwen_meta, tmp_path / "scripted-r1.gguf", script=R1_SCRIPT)
    home = tmp_path / "home"
    r = _pull(home, str(gguf), "--name", "scripted", "--quant", "none")
    assert r.returncode == 0, r.stderr[-2000:]
    srv = ServerProc(["scripted", "--dtype", "fp32", "--threads", "1", "--max-model-len", "512"], home)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        m = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=20, temperature=0).choices[0].message
        assert (m.model_extra["reasoning_content"], m.content) == ("Let me think", "The answer")
    finally:
        assert srv.stop() == 0, "".join(srv.lines[-30:])
    # The same stored name with --engine llamacpp: llama-server gets the GGUF the store kept, byte for
    # byte the file pulled (the source can go away).
    stored = home / "models" / "scripted" / "gguf" / gguf.name
    assert stored.read_bytes() == gguf.read_bytes()
    gguf.unlink()
    r = _dsr1(home, "serve", "scripted", "--engine", "llamacpp", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    p = json.loads(r.stdout)
    argv = p["nodes"][0]["argv"]
    assert argv[argv.index("-m") + 1] == str(stored) and p["served_name"] == "scripted"
    # ... and not once the stored file is damaged: refused before any engine starts (IntegrityError).
    with open(stored, "r+b") as f:
        f.truncate(stored.stat().st_size - 64)
    r = _dsr1(home, "serve", "scripted", "--engine", "llamacpp", "--dry-run")
    assert r.returncode == IntegrityError.exit_code and "damaged GGUF" in r.stderr, r.stderr[-2000:]
