"""Workloads with the real demo model's tokenizer: exact prompt lengths, shared prefix, ShareGPT files."""

from __future__ import annotations

import json
import random

import pytest

from dsr1.bench.workload import Length, RandomWorkload, ShareGPTWorkload, load_tokenizer
from dsr1.errors import ConfigError, NotFoundError, UsageError


@pytest.fixture(scope="module")
def tok(demo_model_dir):
    return load_tokenizer(str(demo_model_dir))


@pytest.mark.parametrize("chat", [True, False])
def test_random_prompts_have_exact_templated_length(tok, chat):
    w = RandomWorkload(tok, Length.parse("60-400", "--input-len"), Length.parse("16-32", "--output-len"),
                       chat=chat, seed=3)
    lengths = set()
    for i in range(60):
        spec = w(i)
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": spec.prompt}], add_generation_prompt=True,
                                          tokenize=True)
            n = len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            n = len(tok.encode(spec.prompt))
        assert n == spec.input_tokens  # the count we report is the real one
        assert 60 <= n <= 400
        assert 16 <= spec.max_tokens <= 32
        lengths.add(n)
    assert len(lengths) > 20  # lengths are sampled over the range


def test_fixed_length_and_fresh_prompts_after_shared_prefix(tok):
    w = RandomWorkload(tok, Length.parse("128", "--input-len"), Length.parse("8", "--output-len"), prefix_len=40,
                       seed=1)
    specs = [w(i) for i in range(10)]
    assert {s.input_tokens for s in specs} == {128}
    assert {s.max_tokens for s in specs} == {8}
    assert all(s.prompt.startswith(w.prefix) for s in specs) and len(tok.encode(w.prefix)) >= 38
    assert len({s.prompt for s in specs}) == 10  # every request differs after the prefix


def test_input_len_below_template_is_a_usage_error(tok):
    with pytest.raises(UsageError, match="chat template") as e:
        RandomWorkload(tok, Length.parse("10", "--input-len"), Length.parse("8", "--output-len"))
    assert "--input-len" in e.value.hint


def test_length_parse():
    assert Length.parse("128", "--x") == Length(128, 128)
    assert Length.parse("64-256", "--x") == Length(64, 256)
    assert 64 <= Length(64, 256).sample(random.Random(0)) <= 256
    for bad in ("0", "abc", "9-3", "-5"):
        with pytest.raises(UsageError):
            Length.parse(bad, "--output-len")


def test_sharegpt_dataset(tmp_path, tok):
    data = [{"id": "a", "conversations": [{"from": "human", "value": "What is the capital of France?"},
                                          {"from": "gpt", "value": "Paris is the capital of France."}]},
            {"id": "b", "conversations": [{"from": "human", "value": "only one turn"}]},
            {"id": "c", "conversations": [{"from": "human", "value": "Count to three."},
                                          {"from": "gpt", "value": "one two three"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    w = ShareGPTWorkload(path, tokenizer=tok, output_len=None, seed=0)
    specs = [w(i) for i in range(4)]
    prompts = {s.prompt for s in specs}
    assert prompts == {"What is the capital of France?", "Count to three."}
    for s in specs:
        reply = "Paris is the capital of France." if "France" in s.prompt else "one two three"
        assert s.max_tokens == len(tok.encode(reply, add_special_tokens=False))
        assert s.input_tokens > len(tok.encode(s.prompt, add_special_tokens=False))  # template counted
    fixed = ShareGPTWorkload(path, tokenizer=None, output_len=Length(5, 5))
    assert fixed(0).max_tokens == 5 and fixed(0).input_tokens is None


def test_sharegpt_bad_files(tmp_path):
    with pytest.raises(NotFoundError):
        ShareGPTWorkload(tmp_path / "missing.json", tokenizer=None, output_len=Length(4, 4))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        ShareGPTWorkload(tmp_path / "bad.json", tokenizer=None, output_len=Length(4, 4))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ConfigError, match="no usable"):
        ShareGPTWorkload(tmp_path / "empty.json", tokenizer=None, output_len=Length(4, 4))
    with pytest.raises(UsageError, match="tokenizer"):
        ShareGPTWorkload(tmp_path / "empty.json", tokenizer=None, output_len=None)


def test_missing_tokenizer_is_not_found(tmp_path):
    with pytest.raises(NotFoundError) as e:
        load_tokenizer(str(tmp_path))
    assert "--tokenizer" in e.value.hint


def test_tokenizer_source_order(tmp_path, demo_model_dir):
    """--tokenizer alone; else a model directory, then dsr1's store (by name, or a hub id by repo), then the
    Hugging Face cache (catalog repos and hub ids, never downloaded). The server's /tokenize comes last:
    tests/test_bench_tokenizer_sources.py."""
    from dsr1 import catalog, store
    from dsr1.bench.tokenizer import candidates, choose

    spec = catalog.models()[0]
    found, _ = candidates("/my/tok", [str(tmp_path), "m"])
    assert [(c.source, c.ref, c.local_only) for c in found] == [("flag", "/my/tok", False)]  # may download
    for name, repo in (("served", None), ("pulled", "Org/Repo")):
        store.write_manifest(store.Manifest(name=name, source=repo or str(demo_model_dir), repo_id=repo,
                                            source_kind="hub" if repo else "dir", model_dir=str(demo_model_dir),
                                            files=[]))
    found, missed = candidates(None, [str(tmp_path), "served", spec.name, None])
    assert [(c.source, c.ref) for c in found] == [("directory", str(tmp_path)), ("store", str(demo_model_dir)),
                                                  ("hf-cache", spec.repo)]
    assert all(c.local_only for c in found)
    assert missed == [f"no stored model {spec.name!r} in {store.store_root()}"]
    found, _ = candidates(None, ["org/repo"])  # vLLM serves a repo id: the model pulled from it
    assert [(c.source, c.ref) for c in found] == [("store", str(demo_model_dir)), ("hf-cache", "org/repo")]
    assert candidates(None, ["loopback"])[0] == []  # a bare alias names no tokenizer
    found, _ = candidates("served", [])  # --tokenizer takes a stored name too
    assert [(c.source, c.ref) for c in found] == [("flag", str(demo_model_dir))]

    choice = choose(None, [spec.name, "served"])  # the catalog repo is not cached here: the store's is used
    assert (choice.source, choice.ref) == ("store", str(demo_model_dir)) and choice.tokenizer is not None
    assert not any("Hugging Face cache" in t for t in choice.tried)  # the store came first
    choice = choose(None, [spec.name])
    assert choice.tokenizer is None and choice.source is None
    assert choice.tried[-1] == f"{spec.repo}: not in the Hugging Face cache (a guessed tokenizer is never downloaded)"
    with pytest.raises(NotFoundError) as e:
        choose(str(tmp_path / "nothing-here"), ["served"])  # asked for explicitly: no quiet fallback
    assert "--tokenizer" in str(e.value) and "--tokenizer" in e.value.hint


def test_a_gguf_model_brings_its_own_tokenizer(demo_gguf, demo_model_dir):
    """`dsr1 bench FILE.gguf` (served by llama-server, whose /tokenize dsr1's front does not expose):
    the vocabulary inside the file counts the tokens, the same counts as the model directory's."""
    from dsr1.bench.tokenizer import candidates, choose

    found, missed = candidates(None, [str(demo_gguf), "smollm2"])
    assert [(c.source, c.ref) for c in found] == [("gguf", str(demo_gguf))] and len(missed) == 1
    choice = choose(None, [str(demo_gguf)])
    assert choice.source == "gguf" and choice.label == f"GGUF file {demo_gguf}"
    ref = choose(str(demo_model_dir), []).tokenizer
    text = "The quick brown fox jumps over the lazy dog, 12345 times."
    assert choice.tokenizer(text).input_ids == ref(text).input_ids
    assert choose(str(demo_gguf), []).source == "flag"  # --tokenizer FILE.gguf
