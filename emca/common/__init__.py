"""The bottom layer: what several layers need, importing nothing of emca above it.

checkpoint_file: one checkpoint file (the names in a run folder, reading it, the architecture
fingerprint it must match);  files: atomic writes;  locks: a folder's exclusive lock (runs,
pack_shards.py);  signals: the stop signals and the mask DataLoader workers start with;
renamed_options: options renamed since v0.2, read in today's names. emca.options, the one-line
form of every option check, sits beside this package at the bottom. Nothing is imported here, so
that a light module (emca.cli) can use one of these without loading torch.

The layers (README, Layout; pyproject.toml's import-linter contract, `make lint`): common | options
<- layers <- models | data <- engine <- analysis <- api | cli | config | launch <- the entry points.
"""
