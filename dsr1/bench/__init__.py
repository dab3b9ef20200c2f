"""`dsr1 bench` core: measure an OpenAI-compatible server the way vLLM's benchmark_serving does.

client.py / http.py  streaming client that timestamps chunks as they arrive
load.py              closed-loop (concurrency) and open-loop (rate) generators
workload.py          random prompts of exact token length, ShareGPT datasets
tokenizer.py         which tokenizer counts: --tokenizer, the store, the HF cache, the server's /tokenize
metrics.py           TTFT / TPOT / ITL / E2EL, percentiles, goodput, token accounting
sweep.py             run_sweep(): preflight, warm-up, points, files after each point
report.py / plots.py results JSON + CSV, tables, compare; PNG plots
server.py            run `dsr1 serve MODEL` for the length of a benchmark
loopback.py          minimal instant streaming server (client ceiling, tests)

Nothing here imports torch; transformers and matplotlib are imported inside functions.
"""
