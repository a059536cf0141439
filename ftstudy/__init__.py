"""The library behind the DVC stages in stages/, split by concern:

config (typed params); hub (Hub inputs, offline), sources (reading files and datasets), splits
(carving and tokenizing), examples (instruction data), data (token files, the prepared meta),
batches; modeling (loading, snapshot), lora (PEFT variants and integrity checks), memory (the
plan); loss (the chunked loss, the checked scoring path), scoring (perplexity protocols), stats
(paired intervals); generation (prompt panel, text quality); training (the one loop), checkpoints
(resume), tracking (live curves), curves, launching (threads, distribution), runtime (device,
precision, FLOPs); outputs (atomic writes), errors; reporting, findings, figures and cards (the
report); synthetic (tiny models and tokenizers for tests and assets).
"""
