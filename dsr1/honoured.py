"""Refuse a `dsr1 serve` setting the planned engine cannot honour (which engines honour which:
dsr1.servesettings).

A setting given on the command line (or to `Deployer.serve`) that the planned engine cannot honour
is a usage error, in `--dry-run` as in a real run, instead of being dropped without a word.
Settings not listed here reach every engine (the front's: host, port, API key, queue, reasoning
field, audit log; the plan's: context, concurrency, memory share, parallel sizes as each engine
takes them).
"""

from __future__ import annotations

from dsr1.errors import UsageError

from dsr1.servesettings import ALL, SETTINGS

# which engines honour each setting that not every engine has: declared in dsr1.servesettings
ENGINES: dict[str, tuple[str, ...]] = {s.name: s.engines for s in SETTINGS if s.engines != ALL}


# values that ask nothing of an engine (the setting's "off"): given or not, any engine honours them
NEUTRAL = {"compile": ("off", "auto", None), "fast_path": (True,), "speculative": ("off",), "lora": ((), []),
           "nodes": (1,), "node_rank": (0,), "engine_port": (0,), "system_prompt": ("auto",), "tool_call_parser": ("auto",), "audit_log": (None,),
           "audit_content": (False,)}


def asked(given: dict) -> list[str]:
    """The names in `given` (name -> value as given) that ask something of the engine."""
    return [n for n, v in given.items() if v not in NEUTRAL.get(n, ())]


def embedded_only(given: dict) -> list[str]:
    """The settings in `given` only the embedded engine honours: with --engine auto they choose it."""
    return [n for n in asked(given) if ENGINES.get(n) == ("embedded",)]


def check(engine: str, given: dict) -> None:
    """Refuse the settings in `given` (name -> value, names as `dsr1 serve`'s parameters) that `engine`
    cannot honour."""
    bad = sorted(n for n in asked(given) if engine not in ENGINES.get(n, ALL))
    if not bad:
        return
    flags = ", ".join("--" + n.replace("_", "-") for n in bad)
    takers = sorted({e for n in bad for e in ENGINES[n]})
    raise UsageError(f"{flags} cannot be honoured by {engine}: {'it is' if len(bad) == 1 else 'they are'} "
                     f"for {' and '.join(takers)}", hint=f"drop {flags}, or choose an engine that takes "
                     f"{'it' if len(bad) == 1 else 'them'} with --engine")
