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

import logging as _logging


class _NoKernelsHubNote(_logging.Filter):
    """bitsandbytes' CPU backend, imported by PEFT whenever bitsandbytes is installed, logs a warning
    on CPUs with AVX512-BF16 that it could not fetch an optional kernel from the Hub
    (`kernels-community`): it then uses its own, so the note is noise, and offline it always fails."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubNote())
