"""The library behind the DVC stages in stages/, split by concern:

config (typed params), data (sources, token files), modeling (loading, snapshot), lora (PEFT
wrapping and integrity checks), scoring (perplexity protocols, intervals), generation (prompt
panel, text quality), training (the one loop), checkpoints (resume), runtime (device, precision,
memory, FLOPs), outputs (atomic writes), reporting and findings (the report).
"""
