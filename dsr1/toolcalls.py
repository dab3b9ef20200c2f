"""Which tool-call parser an engine runs for a model: the `--tool-call-parser` the plan passes.

A model writes its tool calls in the format it was trained on, and the engine must be told which
parser reads it (vLLM `--enable-auto-tool-choice --tool-call-parser NAME`, SGLang
`--tool-call-parser NAME`). llama-server needs no flag: with `--jinja` it reads the format off the
GGUF's chat template (common/chat.cpp). Formats are named as vLLM names its parsers:

- deepseek_v3: R1 and R1-0528 (`<｜tool▁calls▁begin｜>` ... in R1's tokenizer and chat template;
  vLLM's tool_calling docs list R1-0528 under it);
- hermes: the `<tool_call>{json}</tool_call>` of Qwen2.5, the base of the R1-Distill-Qwen models;
- llama3_json: Llama 3.1's JSON calls, the base of the R1-Distill-Llama models.

The distills were tuned on R1's reasoning traces, not on tool use: their calls come from their
base model's habits, and the plan's note says so.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("deepseek_v3", "hermes", "llama3_json")
# each engine's parser for a format (vLLM: vllm/tool_parsers/__init__.py; SGLang: its
# function_call parser registry, `--tool-call-parser`)
ENGINE_PARSER = {
    "vllm": {"deepseek_v3": "deepseek_v3", "hermes": "hermes", "llama3_json": "llama3_json"},
    "sglang": {"deepseek_v3": "deepseekv3", "hermes": "qwen", "llama3_json": "llama3"},  # qwen25: deprecated alias
}
# what in a chat template tells the format (a local model that is not in the catalog)
MARKERS = (("<｜tool▁calls▁begin｜>", "deepseek_v3"), ("<tool_call>", "hermes"),
           ("<|python_tag|>", "llama3_json"))


def chat_template(model_dir: Path) -> str:
    """The model's chat template text, wherever transformers keeps it ("" when none)."""
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        f = model_dir / name
        if not f.is_file():
            continue
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if name.endswith(".jinja"):
            return text
        try:
            t = json.loads(text).get("chat_template")
        except (ValueError, AttributeError):
            continue
        if isinstance(t, list):  # named templates: [{"name", "template"}]
            t = "\n".join(x.get("template", "") for x in t if isinstance(x, dict))
        if isinstance(t, str):
            return t
    return ""


def detect(model_dir: Path) -> str | None:
    """The tool-call format a local model's chat template writes, or None."""
    template = chat_template(model_dir)
    return next((fmt for marker, fmt in MARKERS if marker in template), None)


def parser(engine: str, requested: str, tool_format: str | None) -> tuple[str, str]:
    """(the engine's parser name or "", why) for `--tool-call-parser requested` (auto, none or a name)."""
    if engine not in ENGINE_PARSER:
        return "", ""
    if requested == "none":
        return "", "--tool-call-parser none"
    if requested != "auto":
        return requested, f"--tool-call-parser {requested}"
    if tool_format is None:
        return "", "auto: the model's tool-call format is not known (--tool-call-parser NAME sets one)"
    return ENGINE_PARSER[engine][tool_format], f"auto: the model writes {tool_format} tool calls"
