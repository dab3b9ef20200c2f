"""`dsr1 bench tune`: the engine and settings with the highest goodput under an SLO, on this machine.

What is measured. A candidate is an engine plus serve settings. For each, `dsr1 serve` runs with
them and the load is raised (closed loop, concurrency 1, 2, 4, ...) until the SLO breaks: a
percentile limit such as ttft_p99 <= 2 s or tpot_p99 <= 100 ms no longer holds. A variant of the
best candidate so far starts at the load that one held at instead of 1, and halves from there if
it breaks at once. Between the last load that held and the first that broke, one bisection step
tries the middle. The candidate's
score is the highest goodput (requests/s whose own TTFT/TPOT meet the limits, vLLM's definition)
at a load where the SLO held; 0 if it breaks at concurrency 1.

How candidates are chosen (smarter than a grid, as vLLM's auto_tune and AIConfigurator are):
1. each engine at its defaults (what `dsr1 serve MODEL --engine E` does): the baseline;
2. coordinate descent, coarse: one knob at a time (the most influential first) on the best
   settings so far. A numeric knob is hill-climbed over its coarse values: the next value up,
   on upwards while goodput rises by more than 3%, and downwards only when up did not gain (a full
   sweep of every value measured what the climb skips: the neighbours of a loss). Other knobs try
   each of their values;
3. fine: for numeric knobs, the midpoints between the winner's value and its coarse neighbours.
A candidate's cost is estimated from the finished candidates most like it (the same engine and the
same `--compile`), so a candidate that would overrun `--budget` is skipped and reported as such, never
started.

Every finished candidate is written to `state.json` at once (atomically). An interrupted tune
keeps them; running the same tune again resumes: measured candidates are not run again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from dsr1 import servesettings
from dsr1.bench.metrics import PERCENTILES, SLO_KEYS
from dsr1.errors import UsageError
from dsr1.fsutil import atomic_write_bytes

# Knobs per engine, most influential first: (setting, `dsr1 serve` flag, coarse values), the setting and
# its flag from dsr1.servesettings (a knob must be a setting the engine honours and a tuned profile may
# hold: tests/test_bench_tune.py). Values are tried on top of the engine's defaults; `None` in a
# candidate means "the engine's default".


def _knob(name: str, values: list[Any]) -> tuple[str, str, list[Any]]:
    return name, servesettings.get(name).flag, values


KNOBS: dict[str, list[tuple[str, str, list[Any]]]] = {
    "embedded": [
        _knob("max_concurrent", [4, 8, 16, 32]),
        _knob("prefill_chunk", [128, 256, 512, 1024]),
        _knob("stream_interval", [1, 4]),
        _knob("dtype", ["bf16", "fp32"]),
        _knob("speculative", ["off", "ngram"]),
    ],
    # max_batched_tokens: vLLM's --max-num-batched-tokens, SGLang's --chunked-prefill-size,
    # llama-server's -b (their defaults differ by version and device, so every value is tried)
    "vllm": [_knob("max_concurrent", [4, 8, 16, 32, 64]),
             _knob("max_batched_tokens", [512, 2048, 8192])],
    "sglang": [_knob("max_concurrent", [8, 16, 32, 64]),
               _knob("max_batched_tokens", [2048, 8192])],
    "llamacpp": [_knob("max_concurrent", [2, 4, 8, 16, 32]), _knob("threads", [1, 2]),
                 _knob("max_batched_tokens", [512, 2048, 4096])],
}
# On a CPU, --precision int8/int4 packs the weights for the fast path (weight-only, dsr1.serve.wquant):
# the largest gain at one or a few users on a model bound by memory bandwidth. --compile on costs a
# compile at every start (70-140 s on 2 cores), so it is tried last, and first skipped by a budget.
CPU_KNOBS = {"embedded": [_knob("precision", ["int8", "int4"]), _knob("compile", ["off", "on"])]}
# On a GPU, --precision int8/nf4 is bitsandbytes: it frees memory for more sequences
CUDA_KNOBS = {"embedded": [_knob("compile", ["off", "on"]), _knob("precision", ["int8", "nf4"])],
              "vllm": [_knob("memory_utilization", [0.85, 0.9, 0.95])],
              "sglang": [_knob("memory_utilization", [0.8, 0.85, 0.9])]}
NUMERIC = {"max_concurrent", "prefill_chunk", "stream_interval", "threads", "max_batched_tokens"}
GAIN = 1.03  # a change is kept only when it beats the best so far by more than noise


def parse_slo(text: str) -> dict[str, tuple[int, float]]:
    """`ttft_p99=2s,tpot_p99=100ms` -> {"ttft": (99, 2000.0), "tpot": (99, 100.0)}. A key without
    a percentile means p99; values in ms unless they end in s."""
    if not text:
        raise UsageError("tuning needs a latency target", hint="pass --slo ttft_p99=2s,tpot_p99=100ms")
    out: dict[str, tuple[int, float]] = {}
    for part in text.split(","):
        key, _, value = part.strip().partition("=")
        metric, _, pct = key.partition("_p")
        if metric == "ttft" and key.startswith("ttft_answer"):
            metric, _, pct = "ttft_answer", None, key[len("ttft_answer"):].removeprefix("_p")
        if metric not in SLO_KEYS or (pct and (not pct.isdigit() or int(pct) not in PERCENTILES)):
            raise UsageError(f"--slo {part.strip()!r}: unknown target",
                             hint=f"use METRIC_pNN=LIMIT with METRIC in {', '.join(SLO_KEYS)} and NN in "
                                  f"{', '.join(map(str, PERCENTILES))}, e.g. ttft_p99=2s,tpot_p99=100ms")
        v = value.strip().lower()
        try:
            ms = float(v[:-2]) if v.endswith("ms") else float(v[:-1]) * 1000 if v.endswith("s") else float(v)
        except ValueError:
            raise UsageError(f"--slo {key}={value!r} is not a time", hint="e.g. 2s or 100ms") from None
        if not ms > 0:
            raise UsageError(f"--slo {key}={value!r} must be positive")
        out[metric] = (int(pct) if pct else 99, ms)
    return out


def slo_text(slo: dict[str, tuple[int, float]]) -> str:
    return ",".join(f"{m}_p{p}={ms:g}ms" for m, (p, ms) in slo.items())


def parse_budget(text: str) -> float:
    """`30m`, `90s`, `1h`, `1h30m` or plain seconds -> seconds."""
    import re

    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
    if not parts or "".join(a + b for a, b in parts) != t:
        raise UsageError(f"--budget {text!r} is not a duration", hint="e.g. --budget 30m, 90s or 1h")
    return sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b] for a, b in parts)


@dataclass(frozen=True)
class Candidate:
    engine: str  # "" = let serve choose (and, with use_tuned, apply a tuned profile)
    settings: tuple[tuple[str, Any], ...] = ()  # sorted; only what differs from the engine's defaults
    use_tuned: bool = False  # candidates ignore any tuned profile already there (--no-tuned)

    @property
    def key(self) -> str:
        return (self.engine or ("tuned profile" if self.use_tuned else "serve defaults")) + "".join(
            f" {k}={v}" for k, v in self.settings)

    def get(self, knob: str) -> Any:
        return dict(self.settings).get(knob)

    def with_(self, knob: str, value: Any) -> "Candidate":
        d = dict(self.settings)
        d[knob] = value
        return Candidate(self.engine, tuple(sorted(d.items())), self.use_tuned)

    def serve_args(self) -> list[str]:
        flags = {k: f for table in (KNOBS, CPU_KNOBS, CUDA_KNOBS) for k, f, _ in table.get(self.engine, [])}
        args = ["--engine", self.engine] if self.engine else []
        for k, v in self.settings:
            args += [flags[k], str(v)]
        return args + ([] if self.use_tuned else ["--no-tuned"])


@dataclass
class Level:
    concurrency: int
    goodput: float
    throughput: float  # output tokens/s
    held: bool  # every SLO percentile within its limit
    percentiles: dict[str, float]  # the SLO's percentiles, ms
    failed: int = 0


@dataclass
class Result:
    candidate: Candidate
    score: float  # best goodput (req/s) at a load where the SLO held
    best_load: int
    levels: list[Level]
    seconds: float
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.candidate.engine, "settings": dict(self.candidate.settings), "key": self.candidate.key,
                "score": self.score, "best_load": self.best_load, "seconds": round(self.seconds, 1),
                "error": self.error, "levels": [vars(lv) for lv in self.levels]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Result":
        c = Candidate(d["engine"], tuple(sorted(d["settings"].items())))
        return cls(c, d["score"], d["best_load"], [Level(**lv) for lv in d["levels"]], d["seconds"], d.get("error", ""))


@dataclass
class TuneConfig:
    model: str
    slo: dict[str, tuple[int, float]]
    engines: list[str]
    budget_s: float
    out_dir: Path
    input_len: str = "256"
    output_len: str = "128"
    requests: int | None = None  # per load level; default max(8, 2 x concurrency)
    max_load: int = 64
    seed: int = 0
    cuda: bool = False
    server_timeout: float = 900.0

    def fingerprint(self) -> dict[str, Any]:
        """What makes two tunes comparable (resume only when it matches)."""
        return {"model": self.model, "slo": slo_text(self.slo), "input_len": self.input_len,
                "output_len": self.output_len, "requests": self.requests, "max_load": self.max_load, "seed": self.seed}


@dataclass
class Hooks:
    info: Callable[[str], None] = lambda m: None
    candidate_start: Callable[[Candidate, int, float], None] = lambda c, i, left: None
    level_done: Callable[[Candidate, Level], None] = lambda c, lv: None
    candidate_done: Callable[[Result], None] = lambda r: None


def _kind(c: Candidate) -> tuple[str, bool]:
    return c.engine, c.get("compile") == "on"


def estimate(cand: Candidate, done: list[Result]) -> float:
    """Seconds `cand` will take: the mean of the finished candidates of its kind (its engine, and whether
    it compiles its step at start). One mean over every candidate guessed an embedded start (seconds)
    at a vLLM start's cost (over a minute) and a compiling start at an eager one's, so a mixed tune
    skipped cheap candidates and overran its budget with dear ones (measured: 284 s of a 240 s budget).
    A kind not yet seen is guessed at the dearest candidate so far."""
    same = [r.seconds for r in done if _kind(r.candidate) == _kind(cand)]
    if same:
        return sum(same) / len(same)
    return max((r.seconds for r in done), default=0.0)


# -- measuring one candidate --------------------------------------------------------------------
def measure(cfg: TuneConfig, cand: Candidate, workload, encode, hooks: Hooks, start: int = 1) -> Result:
    """Start `dsr1 serve` with the candidate's settings; find the highest load the SLO holds at.

    From `start` (the load the best candidate so far held at, so a variant of it does not climb
    1, 2, 4, ... again): double while the SLO holds, or halve until it holds; then one bisection
    step between the last load that held and the first that broke."""
    from dsr1.bench.sweep import BenchConfig, check_server, run_sweep
    from dsr1.errors import Dsr1Error
    from dsr1.serve.child import running

    t0 = time.monotonic()
    per_request = {m: ms for m, (_, ms) in cfg.slo.items()}
    levels: list[Level] = []
    log = cfg.out_dir / "servers" / (cand.key.replace(" ", "_").replace("=", "-") + ".log")
    try:
        with running(cfg.model, log=log, extra_args=cand.serve_args(), timeout=cfg.server_timeout) as url:
            bc = BenchConfig(url=url, concurrency=[1], requests=1, warmup=1, input_len=cfg.input_len,
                             output_len=cfg.output_len, slo=per_request, seed=cfg.seed)
            info = check_server(bc)

            def run(c: int) -> Level:
                n = cfg.requests or max(8, 2 * c)
                point_cfg = replace(bc, concurrency=[c], requests=n, warmup=min(c, 4))
                doc = run_sweep(point_cfg, workload, encode=encode, info=info)
                s = doc["points"][0]["summary"]
                pct = {m: (s.get(f"{m}_ms") or {}).get(f"p{p}") for m, (p, _) in cfg.slo.items()}
                held = s["failed"] == 0 and all(v is not None and v <= cfg.slo[m][1] for m, v in pct.items())
                lv = Level(c, s["goodput"] or 0.0, s["output_throughput"], held,
                           {m: round(v, 1) if v is not None else None for m, v in pct.items()}, s["failed"])
                levels.append(lv)
                hooks.level_done(cand, lv)
                return lv

            c, last_ok, broke = max(1, min(start, cfg.max_load)), 0, 0
            while c <= cfg.max_load:
                if run(c).held:
                    last_ok, c = c, c * 2
                    if broke:  # came down from a load that broke: the bracket is found
                        break
                else:
                    broke = c
                    if last_ok or c == 1:
                        break
                    c //= 2  # started too high: come down until the SLO holds
            if last_ok and broke and broke - last_ok > 1:  # one bisection step between held and broke
                run((last_ok + broke) // 2)
    except Dsr1Error as e:  # a candidate that cannot start (e.g. fp32 does not fit) scores 0, tuning goes on
        return Result(cand, 0.0, 0, levels, time.monotonic() - t0, error=str(e).splitlines()[0][:300])
    ok = [lv for lv in levels if lv.held]
    best = max(ok, key=lambda lv: lv.goodput, default=None)
    return Result(cand, best.goodput if best else 0.0, best.concurrency if best else 0, levels,
                  time.monotonic() - t0)


# -- the search ---------------------------------------------------------------------------------
def engine_defaults(model: str, engine: str) -> dict[str, Any]:
    """The values `dsr1 serve MODEL --engine E` uses when not told: the deployment plan's, plus the
    embedded engine's own defaults (dsr1.serve.server.ServeOptions)."""
    from dsr1 import plan as planner
    from dsr1.serve.server import ServeOptions

    out: dict[str, Any] = {}
    try:
        p = planner.make_plan(model, None, planner.Overrides(engine=engine))
    except Exception:  # an engine the plan refuses here still gets measured (and scores 0 with its error)
        p = None
    if p is not None:
        out["max_concurrent"] = p.max_num_seqs
        if engine == "llamacpp" and p.threads:
            out["threads"] = p.threads
        if p.device == "cuda" and engine != "embedded":
            out["memory_utilization"] = p.memory_utilization
    if engine == "embedded":
        o = ServeOptions(model=model)
        out.update(prefill_chunk=o.prefill_chunk, stream_interval=o.stream_interval, speculative=o.speculative)
    return out


class State:
    """state.json: the fingerprint and every finished candidate, rewritten after each."""

    def __init__(self, cfg: TuneConfig):
        self.path = cfg.out_dir / "state.json"
        self.fp = cfg.fingerprint()
        self.results: dict[str, Result] = {}
        self.resumed = 0
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}
            if data.get("fingerprint") == self.fp:
                self.results = {d["key"]: Result.from_json(d) for d in data.get("results", [])}
                self.resumed = len(self.results)

    def add(self, r: Result) -> None:
        self.results[r.candidate.key] = r
        self.save()

    def save(self, extra: dict[str, Any] | None = None) -> None:
        doc = {"fingerprint": self.fp, "results": [r.to_json() for r in self.results.values()], **(extra or {})}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps(doc, indent=1) + "\n").encode())


@dataclass
class Outcome:
    best: Result | None
    defaults: dict[str, Result]  # engine -> its defaults' result
    results: list[Result]
    skipped: list[tuple[str, str]]  # (candidate key, why)
    resumed: int
    seconds: float


def tune(cfg: TuneConfig, hooks: Hooks | None = None) -> Outcome:
    from dsr1.bench.sweep import BenchConfig
    from dsr1.bench.workload import build_workload, token_counter

    hooks = hooks or Hooks()
    state = State(cfg)
    if state.resumed:
        hooks.info(f"resuming: {state.resumed} candidate(s) already measured in {state.path}")
    # One workload for every candidate: the same prompts, so candidates differ only in settings.
    wcfg = BenchConfig(url="", concurrency=[1], requests=1, input_len=cfg.input_len, output_len=cfg.output_len,
                       seed=cfg.seed)
    workload, choice = build_workload(wcfg, cfg.model)
    encode = token_counter(choice.tokenizer)
    t0 = time.monotonic()
    skipped: list[tuple[str, str]] = []

    def run(cand: Candidate, start: int = 1) -> Result | None:
        if cand.key in state.results:
            return state.results[cand.key]
        used = time.monotonic() - t0
        cost = estimate(cand, list(state.results.values()))
        if used + cost > cfg.budget_s:
            skipped.append((cand.key, f"budget: {used:.0f} s used of {cfg.budget_s:.0f} s, this candidate would "
                                      f"take ~{cost:.0f} s"))
            return None
        hooks.candidate_start(cand, len(state.results) + 1, cfg.budget_s - used)
        r = measure(cfg, cand, workload, encode, hooks, start=max(1, start))
        state.add(r)
        hooks.candidate_done(r)
        return r

    knobs = {e: KNOBS.get(e, []) + (CUDA_KNOBS if cfg.cuda else CPU_KNOBS).get(e, []) for e in cfg.engines}
    own = {e: engine_defaults(cfg.model, e) for e in cfg.engines}

    def vary(cand: Candidate, knob: str, value: Any) -> Candidate:
        """cand with knob=value; a value equal to the engine's own default is left unset, so the
        default is never measured twice under two names."""
        c = cand.with_(knob, value)
        if own[cand.engine].get(knob) == value:
            c = Candidate(c.engine, tuple((k, v) for k, v in c.settings if k != knob))
        return c

    defaults: dict[str, Result] = {}
    for engine in cfg.engines:  # 1. every engine at its defaults
        r = run(Candidate(engine))
        if r is not None:
            defaults[engine] = r

    def current(cand: Candidate, knob: str) -> Any:
        """The knob's value in `cand`: set by the candidate, else the engine's own default (None: unknown)."""
        v = cand.get(knob)
        return own[cand.engine].get(knob) if v is None else v

    def climb(best: Result, knob: str, values: list[Any]) -> Result:
        """Hill-climb one numeric knob over its coarse values: the neighbour above first (more
        concurrency and larger prompt chunks are what usually raises goodput), on while it gains;
        the other way only when that did not."""
        cur = current(best.candidate, knob)
        grid = sorted(set(values) | {cur})
        i = grid.index(cur)
        for step in (1, -1):
            j, gained = i + step, False
            while 0 <= j < len(grid):
                r = run(vary(best.candidate, knob, grid[j]), start=best.best_load)
                if r is None or r.score <= best.score * GAIN:
                    break
                best, gained, j = r, True, j + step
            if gained:
                break
        return best

    for engine in sorted(defaults, key=lambda e: -defaults[e].score):  # 2. coarse, best engine first
        best = defaults[engine]
        for knob, _, values in knobs[engine]:
            if knob in NUMERIC and current(best.candidate, knob) is not None:
                best = climb(best, knob, values)
                continue
            for v in values:
                cand = vary(best.candidate, knob, v)
                if cand.key == best.candidate.key:
                    continue
                r = run(cand, start=best.best_load)
                if r is not None and r.score > best.score * GAIN:
                    best = r
        coarse = best
        # 3. fine: midpoints around the coarse winner's numeric values
        for knob, _, values in knobs[engine]:
            cur = current(coarse.candidate, knob)
            if knob not in NUMERIC or cur is None or cur not in values:
                continue
            i = values.index(cur)
            for j in (i - 1, i + 1):
                if 0 <= j < len(values):
                    mid = (cur + values[j]) // 2
                    if mid not in (cur, values[j]):
                        r = run(vary(coarse.candidate, knob, mid), start=coarse.best_load)
                        if r is not None and r.score > best.score * GAIN:
                            best = r
    done = list(state.results.values())
    ranked = sorted(done, key=lambda r: -r.score)
    best = ranked[0] if ranked and ranked[0].score > 0 else None
    state.save({"best": best.candidate.key if best else None, "skipped": skipped})
    return Outcome(best, defaults, ranked, skipped, state.resumed, time.monotonic() - t0)


# -- the report ---------------------------------------------------------------------------------
def serve_command(model: str, cand: Candidate) -> str:
    return " ".join(["dsr1", "serve", model, *[a for a in cand.serve_args() if a != "--no-tuned"]])


def write_report(cfg: TuneConfig, out: Outcome) -> dict[str, str]:
    """report.md (table, reproduce command), goodput.png (goodput per candidate); paths."""
    lines = [f"# dsr1 bench tune: {cfg.model}", "",
             f"SLO {slo_text(cfg.slo)}; prompts {cfg.input_len} tokens, outputs {cfg.output_len}; "
             f"budget {cfg.budget_s:.0f} s, used {out.seconds:.0f} s"
             + (f" (resumed with {out.resumed} measured)" if out.resumed else ""), "",
             "| candidate | goodput (req/s) | at concurrency | SLO percentiles at that load (ms) | time (s) |",
             "|---|---|---|---|---|"]
    for r in out.results:
        lv = next((x for x in r.levels if x.concurrency == r.best_load), None)
        pct = ", ".join(f"{k} {v}" for k, v in (lv.percentiles.items() if lv else []))
        lines.append(f"| `{r.candidate.key}` | {r.score:.3f} | {r.best_load or '-'} | {pct or r.error or 'broke at 1'} "
                     f"| {r.seconds:.0f} |")
    if out.skipped:
        lines += ["", "Skipped (not started):"] + [f"- `{k}`: {why}" for k, why in out.skipped]
    if out.best:
        base = out.defaults.get(out.best.candidate.engine)
        lines += ["", f"Best: `{out.best.candidate.key}`, {out.best.score:.3f} req/s"
                  + (f", {out.best.score / base.score:.2f}x its engine's defaults" if base and base.score else ""),
                  "", "Reproduce:", "", f"    {serve_command(cfg.model, out.best.candidate)}"]
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    md = cfg.out_dir / "report.md"
    atomic_write_bytes(md, ("\n".join(lines) + "\n").encode())
    files = {"report": str(md), "state": str(cfg.out_dir / "state.json")}
    if out.results:
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.35 * len(out.results) + 1.5))
        keys = [r.candidate.key for r in reversed(out.results)]
        ax.barh(keys, [r.score for r in reversed(out.results)],
                color=["tab:green" if out.best and r is out.best else "tab:blue" for r in reversed(out.results)])
        ax.set_xlabel(f"goodput, requests/s ({slo_text(cfg.slo)})")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        png = cfg.out_dir / "goodput.png"
        atomic_write_bytes(png, buf.getvalue())
        files["plot"] = str(png)
    return files


def tuned_profile(cfg: TuneConfig, out: Outcome, hardware: str):
    """The winner as a dsr1.tuned.Tuned (engine defaults filled in only where the candidate set them)."""
    from dsr1.tuned import Tuned

    best = out.best
    base = out.defaults.get(best.candidate.engine)
    return Tuned(model=cfg.model, hardware=hardware, settings={"engine": best.candidate.engine, **dict(best.candidate.settings)},
                 slo=slo_text(cfg.slo), goodput=best.score, default_goodput=base.score if base else 0.0,
                 command=serve_command(cfg.model, best.candidate))
