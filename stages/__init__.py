"""DVC stages: one thin module per stage in dvc.yaml, each run as `python -m stages.<name>`.

With FTSTUDY_WARM set (`make demo` and the tests set it), a stage's process first asks that warm
server to run it in a fork that has torch and transformers imported already (ftstudy/warm.py); it
starts cold, as without it, when none answers or the server declines."""

import os as _os
import sys as _sys

if _os.environ.get("FTSTUDY_WARM") and _sys.argv[:1] == ["-m"]:
    from ftstudy import warm as _warm

    _warm.forward(_os.environ["FTSTUDY_WARM"])
