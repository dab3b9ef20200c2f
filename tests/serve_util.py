"""Helpers for the serve tests: start a real `dsr1 serve` process, build a tiny R1 model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

R1_SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
CHAIN_WORDS = ["Let", " me", " think", "The", " answer"]


class ServerProc:
    """A `python -m dsr1 serve ...` child on 127.0.0.1 with a free port."""

    def __init__(self, args: list[str], home: Path, env: dict[str, str] | None = None, timeout: float = 180):
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
        full_env.pop("DSR1_API_KEY", None)  # only the key a test asks for
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "dsr1", "serve", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
        self.lines: list[str] = []
        self.url = ""
        deadline = time.monotonic() + timeout
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("dsr1 serve: ready on "):
                self.url = line.split("ready on ", 1)[1].strip()
                break
            if time.monotonic() > deadline:
                break
        if not self.url:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-30:]))
        # keep draining stderr so the child never blocks on a full pipe
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.lines.append(line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def build_tiny_r1(src: Path, out: Path, *, forced_think: bool) -> Path:
    """A tiny Qwen2 with R1's special tokens and chat template whose greedy output is fixed.

    The decoder layers' output projections are zeroed, so each position's hidden
    state is its own token's embedding: the model is a bigram table. Embeddings and
    lm_head rows are set so that after "<｜Assistant｜>" it writes
    "<think>\\nLet me think</think>The answer<｜end▁of▁sentence｜>" (with logits
    large enough that sampling at temperature 0.6 follows the chain too).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsr1.serve.engine import R1_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": R1_SPECIAL})
    tok.add_tokens(["<think>", "</think>"])  # not special in R1's tokenizer: they show in decoded text
    tok.bos_token, tok.eos_token = R1_SPECIAL[0], R1_SPECIAL[1]
    tok.chat_template = R1_CHAT_TEMPLATE if forced_think else R1_CHAT_TEMPLATE.replace("<think>\\n", "")
    model = AutoModelForCausalLM.from_pretrained(src)
    model.resize_token_embeddings(len(tok))
    ids = tok.convert_tokens_to_ids
    chain = [ids("<｜Assistant｜>"), ids("<think>"), tok.encode("\n", add_special_tokens=False)[0]]
    for w in CHAIN_WORDS[:3]:
        chain += tok.encode(w, add_special_tokens=False)
    chain.append(ids("</think>"))
    for w in CHAIN_WORDS[3:]:
        chain += tok.encode(w, add_special_tokens=False)
    chain.append(ids(R1_SPECIAL[1]))
    assert len(chain) == 10 and len(set(chain)) == 10, chain
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        emb.zero_()
        head.zero_()
        for i, (t, nxt) in enumerate(zip(chain, chain[1:])):
            emb[t, i % hidden] = 10.0
            head[nxt, i % hidden] = 10.0
    eos = ids(R1_SPECIAL[1])
    model.config.eos_token_id = eos
    model.config.bos_token_id = ids(R1_SPECIAL[0])
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = ids(R1_SPECIAL[0])
    model.config.tie_word_embeddings = False
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
