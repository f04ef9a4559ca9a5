"""The bottom layer: what several layers need, importing nothing of emca above it.

checkpoint_file: one checkpoint file (the names in a run folder, reading it, the architecture
fingerprint it must match);  files: atomic writes;  locks: a folder's exclusive lock (runs,
pack_shards.py);  signals: the stop signals and the mask DataLoader workers start with.
emca.options, the one-line form of every option check, sits beside this package at the bottom.

The layers (pyproject.toml's import-linter contract, `make lint`): common and options <- layers <-
models, data <- engine <- analysis <- emca.api, emca.cli, emca.config, emca.launch and the scripts.
"""
