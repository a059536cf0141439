"""The library behind the DVC stages in stages/, grouped the way the data flows:

- the ground, used by every room: config (typed params), errors, outputs (atomic writes), hub (Hub
  inputs, offline), modeling (loading, snapshot), loss (the chunked loss, the checked scoring path),
  runtime (device, precision, FLOPs), cores (CPU threads), curves, synthetic (tiny models and
  tokenizers for tests and assets), warm (the stages' processes forked from one that has imported
  torch already);
- data/: reading sources, carving splits, instruction examples, token files, batches;
- train/: the one loop (session, loop, finish, training), checkpoints, lora, memory, tracking,
  launching;
- measure/: scoring, stats (paired intervals), generation, answers, benchmarks;
- report/: reporting, findings, task_report, figures, cards.

Rooms import the ground and the rooms before them only: data <- train, measure <- report.
"""

import logging as _logging


class _NoKernelsHubNote(_logging.Filter):
    """bitsandbytes' CPU backend, imported by PEFT whenever bitsandbytes is installed, logs a warning
    on CPUs with AVX512-BF16 that it could not fetch an optional kernel from the Hub
    (`kernels-community`): it then uses its own, so the note is noise, and offline it always fails."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubNote())
