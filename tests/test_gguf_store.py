"""GGUFs in the store: kept as they came, split sets read whole from their first shard, every shard
checked, imports checked weight for weight against the file.

The split sets are the demo GGUF (SmolLM2-135M-Instruct Q4_1, 272 tensors) rewritten as 3 shards
with gguf's own writer (tests/gguf_util.split_gguf), as llama.cpp's gguf-split writes them.
Hub pulls run against tests/fakehub.py, a real HTTP server speaking the hub protocol.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsr1 import gguf_files, store
from dsr1.errors import IntegrityError, NotFoundError, UsageError
from tests import interrupt
from tests.gguf_util import split_gguf
from tests.test_pull_download import cli, hub  # noqa: F401 (hub: the fake hub fixture, on 127.0.0.1)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(demo_gguf, tmp_path_factory) -> list[Path]:
    return split_gguf(demo_gguf, tmp_path_factory.mktemp("split") / "smol.gguf", shards=3)


def _safetensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _greedy(model_dir: Path, prompt: str = "Name three colours.") -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_split_set_is_stored_whole_and_imports_like_the_whole_file(demo_gguf, shards):
    r = cli("pull", str(shards[0]), "--name", "split", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["format"] == "gguf" and out["gguf_quant"] == "Q4_1" and out["checks"]["shards"] == 3
    kept = store.store_root() / "split" / "gguf"
    assert sorted(p.name for p in kept.iterdir()) == [p.name for p in shards]
    assert all((kept / p.name).read_bytes() == p.read_bytes() for p in shards)  # as they came
    assert cli("verify", "split").exit_code == 0
    r = cli("pull", str(demo_gguf), "--name", "whole", "--json")
    assert r.exit_code == 0, r.output
    # No llama-server here: each pull made the embedded engine's copy. Tensor for tensor the same.
    split_w, whole_w = _safetensors(Path(out["embedded_dir"])), _safetensors(store.resolve_model_dir("whole"))
    assert split_w.keys() == whole_w.keys() and len(split_w) >= 200
    assert all(split_w[k].equal(whole_w[k]) for k in split_w)
    answer = _greedy(store.resolve_model_dir("split"))
    assert answer == _greedy(store.resolve_model_dir("whole"))
    assert "red" in answer.lower() or "blue" in answer.lower(), answer
    rows = {m["name"]: m for m in json.loads(cli("list", "--json").stdout)["models"]}
    assert rows["split"]["gguf_quant"] == "Q4_1" and rows["split"]["files"] == 3


@pytest.mark.slow
def test_import_matches_gguf_py_dequantization(demo_gguf):
    """Checked against gguf-py's own dequantizer, not transformers' loader (the code under test):
    tensors transformers keeps in the file's layout, each equal after bf16 rounding."""
    import gguf
    import numpy as np
    import torch

    assert cli("pull", str(demo_gguf), "--name", "demo", "--json").exit_code == 0
    weights = _safetensors(store.resolve_model_dir("demo"))
    reader = gguf.GGUFReader(str(demo_gguf))
    by_name = {t.name: t for t in reader.tensors}
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight", "blk.29.ffn_up.weight": "model.layers.29.mlp.up_proj.weight",
             "blk.17.attn_v.weight": "model.layers.17.self_attn.v_proj.weight", "output_norm.weight": "model.norm.weight"}
    for gname, tname in pairs.items():
        t = by_name[gname]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed([int(d) for d in t.shape])))
        got = weights[tname].float().numpy()
        assert got.shape == want.shape, gname
        assert np.abs(got - torch.from_numpy(np.ascontiguousarray(want)).bfloat16().float().numpy()).max() == 0, gname
        assert np.abs(want).max() > 0  # a real tensor, not an all-zero one
    # every weight the model has came from the file: 272 tensors, the output head tied to the embeddings
    assert len(weights) == len(reader.tensors)


def test_missing_middle_shard_is_refused_with_nothing_stored(shards, tmp_path):
    d = tmp_path / "gap"
    d.mkdir()
    for p in (shards[0], shards[2]):
        (d / p.name).write_bytes(p.read_bytes())
    r = cli("pull", str(d / shards[0].name), "--name", "gap")
    assert r.exit_code == IntegrityError.exit_code, r.output
    assert shards[1].name in r.output and "not in" in r.output
    assert not (store.store_root() / "gap").exists() or not list((store.store_root() / "gap").iterdir())
    assert store.list_models() == []


def test_damaged_shard_is_refused_with_nothing_stored(shards, tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    for p in shards:
        (d / p.name).write_bytes(p.read_bytes())
    last = d / shards[2].name
    last.write_bytes(last.read_bytes()[:-4096])  # a download cut short
    r = cli("pull", str(d / shards[0].name), "--name", "cut")
    assert r.exit_code == IntegrityError.exit_code, r.output
    assert "damaged" in r.output and shards[2].name in r.output
    assert store.list_models() == []


def test_a_later_shard_names_the_first(shards):
    r = cli("pull", str(shards[1]), "--name", "x")
    assert r.exit_code == UsageError.exit_code and "shard 2 of 3" in r.output and shards[0].name in r.output


def test_a_renamed_shard_is_not_taken_for_a_model(shards, tmp_path):
    odd = tmp_path / "model.gguf"
    odd.write_bytes(shards[0].read_bytes())
    r = cli("pull", str(odd), "--name", "odd")
    assert r.exit_code == UsageError.exit_code and "split GGUF" in r.output
    assert store.list_models() == []


def test_a_gguf_lacking_a_weight_is_refused(demo_gguf, tmp_path):
    """A file without one layer's attn_output: transformers would initialise it at random and answer
    gibberish; the import refuses it, and nothing is stored."""
    import gguf

    reader = gguf.GGUFReader(str(demo_gguf))
    out = tmp_path / "holed.gguf"
    w = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.alignment"):
            continue
        main = f.types[0]
        w.add_key_value(f.name, f.contents(), main, sub_type=f.types[-1] if main == gguf.GGUFValueType.ARRAY else None)
    kept = [t for t in reader.tensors if t.name != "blk.3.attn_output.weight"]
    for t in kept:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in kept:
        w.write_tensor_data(t.data)
    w.close()
    r = cli("pull", str(out), "--name", "holed")
    assert r.exit_code == IntegrityError.exit_code, r.output
    assert "layers.3.self_attn.o_proj" in r.output
    assert store.list_models() == []


def test_an_interrupted_local_copy_resumes(shards, monkeypatch):
    """What a killed copy leaves (the partial folder, its source stamp, half a shard) is continued,
    and a partial that is not the file's start is copied again."""
    from dsr1 import gguf_store
    from dsr1.download import Reporter

    entry = store.entry_dir("resumed")
    partial = entry / gguf_store.PARTIAL
    partial.mkdir(parents=True)
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in shards}
    (partial / ".source.json").write_text(json.dumps(stamp))
    (partial / shards[0].name).write_bytes(shards[0].read_bytes()[:5 << 20])
    (partial / shards[1].name).write_bytes(b"x" * 4096)  # not the file's start

    class Count(Reporter):
        done = 0

        def start(self, total, done):
            Count.done = done

    folder, records = gguf_store.store_set(gguf_files.read_set(shards[0]), entry, Count())
    assert Count.done == (5 << 20) + 4096
    assert all((folder / p.name).read_bytes() == p.read_bytes() for p in shards)
    import hashlib

    assert [r.sha256 for r in records] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in shards]
    assert not partial.exists()


# --- from a hub: OWNER/NAME:QUANT ------------------------------------------------------------

def _gguf_repo(shards: list[Path], demo_gguf: Path) -> dict[str, bytes]:
    """Laid out as Unsloth's R1 repo is: one folder per quantization, shards inside."""
    files = {f"Smol-Q4_1/Smol-Q4_1-{p.name.split('-', 1)[1]}": p.read_bytes() for p in shards}
    files["Smol-Q8_0.gguf"] = b"GGUF" + b"\0" * 2048  # another quantization: not fetched
    files["README.md"] = b"# tiny"
    return files


@pytest.mark.slow
def test_hub_quant_pull_fetches_that_set_only(hub, shards, demo_gguf):
    hub.add_repo("acme/Smol-GGUF", _gguf_repo(shards, demo_gguf))
    r = cli("pull", "acme/Smol-GGUF:Q4_1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["name"] == "smol-q4_1" and out["format"] == "gguf" and out["checks"]["shards"] == 3
    assert hub.sent.get("Smol-Q8_0.gguf", 0) == 0 and hub.sent.get("README.md", 0) == 0
    m = store.load("smol-q4_1")
    assert m.gguf_file == "Smol-Q4_1/Smol-Q4_1-00001-of-00003.gguf" and len(m.files) == 3
    assert m.gguf_path.is_file() and cli("verify", "smol-q4_1").exit_code == 0
    r = cli("pull", "acme/Smol-GGUF:IQ1_S")
    assert r.exit_code == NotFoundError.exit_code and "Smol-Q4_1" in r.output


def test_hub_set_with_a_missing_shard_is_refused(hub, shards, demo_gguf):
    files = _gguf_repo(shards, demo_gguf)
    del files["Smol-Q4_1/Smol-Q4_1-00002-of-00003.gguf"]
    hub.add_repo("acme/Smol-GGUF", files)
    r = cli("pull", "acme/Smol-GGUF:Q4_1")
    assert r.exit_code == IntegrityError.exit_code and "00002-of-00003" in r.output, r.output
    assert sum(hub.sent.values()) == 0 and store.list_models() == []


@pytest.mark.slow
def test_hub_pull_killed_mid_shard_resumes(hub, shards, demo_gguf):
    hub.add_repo("acme/Smol-GGUF", _gguf_repo(shards, demo_gguf))
    hub.throttle = 8 << 20
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_ENDPOINT=hub.endpoint)
    proc = interrupt.popen([sys.executable, "-m", "dsr1", "pull", "acme/Smol-GGUF:Q4_1", "--quiet", "--workers", "1"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    blobs = Path(os.environ["HF_HOME"]) / "hub" / "models--acme--Smol-GGUF" / "blobs"
    deadline, found = time.time() + 120, []
    while time.time() < deadline:  # an observable state, not a timer: a shard part-way down
        found = list(blobs.glob("*.dsr1.incomplete")) if blobs.is_dir() else []
        if found and found[0].stat().st_size > 4 << 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert store.list_models() == []
    hub.throttle = None
    r = cli("pull", "acme/Smol-GGUF:Q4_1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["resumed_bytes"] > 4 << 20
    # only what was in flight at the kill (sent, never written) is fetched twice
    assert sum(hub.sent.values()) - sum(p.stat().st_size for p in shards) < 2 << 20


@pytest.mark.slow
def test_pull_r1_on_base_fetches_the_planned_gguf_and_the_plan_then_reads_it(hub, demo_gguf, tmp_path):
    """`dsr1 pull r1 --profile base` pulls what the base-tier plan runs (the UD-Q2_K_XL set of Unsloth's
    repo, every shard); the plan then loads the stored file and places it from its own tensor table.
    The fake hub's set is the demo GGUF split 5 ways under R1's file names (R1 itself is 227 GB)."""
    from dsr1 import plan as planner

    shards = split_gguf(demo_gguf, tmp_path / "DeepSeek-R1-UD-Q2_K_XL.gguf", shards=5)
    hub.add_repo("unsloth/DeepSeek-R1-GGUF", {f"DeepSeek-R1-UD-Q2_K_XL/{p.name}": p.read_bytes() for p in shards})
    before = planner.make_plan("r1", "base", planner.Overrides(engine_port=1))
    assert before.checkpoint == "unsloth/DeepSeek-R1-GGUF:UD-Q2_K_XL" and before.needs_pull
    r = cli("pull", "r1", "--profile", "base", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["name"] == "r1-ud-q2_k_xl" and out["format"] == "gguf" and out["checks"]["shards"] == 5
    after = planner.make_plan("r1", "base", planner.Overrides(engine_port=1))
    stored = store.load("r1-ud-q2_k_xl").gguf_path
    assert after.model_path == str(stored) and not after.needs_pull
    assert after.placement["layout"] == "file" and after.placement["n_layer"] == 30  # the file's own table
    assert any("placed from its own tensor table" in n for n in after.notes)
    argv = after.nodes[0].argv
    assert argv[argv.index("-m") + 1] == str(stored)
