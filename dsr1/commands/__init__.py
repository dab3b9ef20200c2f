"""One module per CLI command: parse flags, call one core function, render."""
