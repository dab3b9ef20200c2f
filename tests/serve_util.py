"""Helpers for the serve tests: start a real `dsr1 serve` process, build a tiny R1 model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
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
        # Read stderr on a thread, so the deadline holds even when the child prints nothing (a silent
        # hang must fail the test at `timeout`, not block the run).
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self._ready.wait(timeout)
        if not self.url:
            self.proc.kill()
            if not self._reader.is_alive():  # stderr closed: the child is exiting; let it, before saying which
                try:
                    self.proc.wait(2)
                except subprocess.TimeoutExpired:
                    pass
            why = "exited" if self.proc.poll() is not None else f"no ready line within {timeout:.0f}s"
            raise RuntimeError(f"server did not start ({why}):\n" + "".join(self.lines[-30:]))

    def _drain(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.lines.append(line)
            if not self.url and line.startswith("dsr1 serve: ready on "):
                self.url = line.split("ready on ", 1)[1].strip()
                self._ready.set()
        self._ready.set()  # the child exited (its stderr closed): no ready line will come

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

    After "<｜Assistant｜>" it writes "<think>\\nLet me think</think>The answer<｜end▁of▁sentence｜>";
    with `forced_think` the template ends the prompt with "<think>\\n" itself (DeepSeek's current
    template), and the model goes on from there.
    """
    from dsr1.serve.engine import R1_CHAT_TEMPLATE

    script = ["<｜Assistant｜>", "<think>", "\n", *CHAIN_WORDS[:3], "</think>", *CHAIN_WORDS[3:], R1_SPECIAL[1]]
    template = R1_CHAT_TEMPLATE if forced_think else R1_CHAT_TEMPLATE.replace("<think>\\n", "")
    return build_scripted_r1(src, out, [script], chat_template=template)


def build_scripted_r1(src: Path, out: Path, scripts: list[list[str]], *, chat_template: str) -> Path:
    """A tiny Qwen2 with R1's special tokens and `<think>`/`</think>` whose greedy output follows scripts.

    A script is a list of pieces, each exactly one token (a tag, a special token or one BPE
    token of the base tokenizer). The first piece is its trigger: when it is the last prompt
    token, the model writes the rest, one piece per step, up to "<｜end▁of▁sentence｜>".
    The decoder layers' output projections are zeroed, so each position's hidden state is
    its own token's embedding: the model is a bigram table, one hidden dimension per
    (token, next token) pair, with logits large enough that sampling at temperature 0.6
    follows it too. Hence a token has one successor: scripts may share a tail (they merge
    at a common token) but never branch.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": R1_SPECIAL})
    tok.add_tokens(["<think>", "</think>"])  # not special in R1's tokenizer: they show in decoded text
    tok.bos_token, tok.eos_token = R1_SPECIAL[0], R1_SPECIAL[1]
    tok.chat_template = chat_template
    model = _bigram(AutoModelForCausalLM.from_pretrained(src), tok, scripts)
    eos, bos = tok.convert_tokens_to_ids(R1_SPECIAL[1]), tok.convert_tokens_to_ids(R1_SPECIAL[0])
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.bos_token_id = eos, bos
    model.config.tie_word_embeddings = False
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out



def _bigram(model, tok, scripts: list[list[str]]):
    """`model` (its vocabulary resized to `tok`) made a bigram table whose greedy output follows `scripts`."""
    import torch

    model.resize_token_embeddings(len(tok))
    successor: dict[int, int] = {}
    for script in scripts:
        ids = []
        for piece in script:
            one = tok.encode(piece, add_special_tokens=False)
            assert len(one) == 1, f"script piece {piece!r} is {len(one)} tokens: {one}"
            ids += one
        for t, nxt in zip(ids, ids[1:]):
            assert successor.setdefault(t, nxt) == nxt, f"{tok.decode([t])!r} would have two successors"
    hidden = model.config.hidden_size
    assert len(successor) <= hidden, f"{len(successor)} transitions need a hidden size of at least that"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb.zero_()
        head.zero_()
        for i, (t, nxt) in enumerate(successor.items()):
            emb[t, i] = 10.0
            head[nxt, i] = 10.0
    return model

# A ChatML template that renders tools the way Qwen2.5's does in spirit: an assistant's earlier calls
# as <tool_call> JSON (which is also how llama-server recognises the Hermes format), tool results as
# their own turn. With `tools` the generation prompt ends in "<tools>", so a bigram model can tell
# a request that offers tools from one that does not.
TOOLS_TEMPLATE = (  # newlines as expressions: transformers renders with trim_blocks
    "{% for m in messages %}<|im_start|>{{ m.role }}{{ '\\n' }}"
    "{% if m.content %}{{ m.content }}{% endif %}"
    "{% if m.tool_calls %}{% for tc in m.tool_calls %}<tool_call>{{ '\\n' }}"
    "{\"name\": \"{{ tc.function.name }}\", \"arguments\": {{ tc.function.arguments if tc.function.arguments is string "
    "else tc.function.arguments | tojson }}}{{ '\\n' }}</tool_call>{% endfor %}{% endif %}<|im_end|>{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% if tools %}<tools>{% else %}{{ '\\n' }}{% endif %}{% endif %}")
TOOL_CALL_JSON = '\n{"name": "get_weather", "arguments": {"city": "Paris", "notify": "ops@example.org"}}\n'
TOOL_SCRIPT = ["<tools>", "<tool_call>", TOOL_CALL_JSON, "</tool_call>", "<|im_end|>"]
TEXT_SCRIPT = ["\n", "The", " weather", " in", " Paris", " is", " sunny", "<|im_end|>"]


def build_scripted_chatml(src: Path, out: Path, scripts: list[list[str]], *, added: list[str],
                          chat_template: str) -> Path:
    """A bigram-table model (as build_scripted_r1) on `src`'s ChatML tokenizer with `added` tokens
    (shown in decoded text, as Qwen's <tool_call> is): its greedy output follows `scripts`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(added)
    tok.chat_template = chat_template
    model = _bigram(AutoModelForCausalLM.from_pretrained(src), tok, scripts)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tok.eos_token = "<|im_end|>"
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eos
    model.config.tie_word_embeddings = False
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _vllm_base(demo_model_dir: Path, out: Path) -> Path:
    """A random 1-layer Qwen2 on the demo's tokenizer with head_dim 64 (128 hidden, 2 heads), which vLLM's
    CPU attention takes: the base the scripted models are made from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tool_model(demo_model_dir: Path, out: Path) -> Path:
    """A tiny Qwen2 (head_dim 64, which vLLM's CPU attention takes) on the demo's tokenizer that answers
    a chat offering tools with `<tool_call>{"name": "get_weather", ...}</tool_call>` (the Hermes/Qwen2.5
    format of the R1 distills' base) and any other chat with "The weather in Paris is sunny"."""
    return build_scripted_chatml(_vllm_base(demo_model_dir, out / "base"), out / "model", [TOOL_SCRIPT, TEXT_SCRIPT],
                                 added=["<tools>", "<tool_call>", "</tool_call>", TOOL_CALL_JSON],
                                 chat_template=TOOLS_TEMPLATE)


def build_r1_for_vllm(demo_model_dir: Path, d: Path) -> Path:
    """build_scripted_r1 on a base vLLM's CPU attention takes (head_dim 64), the template without
    "<think>\\n" (the model opens the tag itself): its greedy answer is
    "<think>\\nLet me think</think>The answer", 8 tokens."""
    from dsr1.serve.engine import R1_CHAT_TEMPLATE

    _vllm_base(demo_model_dir, d / "base")
    script = ["<｜Assistant｜>", "<think>", "\n", "Let", " me", " think", "</think>", "The", " answer",
              "<｜end▁of▁sentence｜>"]
    return build_scripted_r1(d / "base", d / "r1", [script], chat_template=R1_CHAT_TEMPLATE.replace("<think>\\n", ""))


def greedy_completion(srv: "ServerProc", prompt: str = "The capital of France is", tokens: int = 8) -> str:
    """A greedy completion of `tokens` tokens through the official client from a started server; checks that
    exactly that many came back and that the text is not empty."""
    import openai

    cli = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    r = cli.completions.create(model=cli.models.list().data[0].id, prompt=prompt, max_tokens=tokens, temperature=0)
    assert r.usage.completion_tokens == tokens and r.choices[0].text.strip()
    return r.choices[0].text
