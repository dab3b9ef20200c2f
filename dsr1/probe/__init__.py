"""Hardware and software probes for `dsr1 doctor`. Nothing here imports torch."""
