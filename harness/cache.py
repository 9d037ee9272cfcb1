"""The harness's one cache folder, and what it holds: nothing else is written outside results/ and reports/.

``$QLORA_HARNESS_CACHE``, else ``$XDG_CACHE_HOME/qlora-harness``, else ``~/.cache/qlora-harness``:

- ``synthetic/``: built synthetic checkpoints and tokenizers (harness.models), reused by every later run;
- ``datasets/``: the datasets library's cache of the JSONL files a worker loads (``HF_DATASETS_CACHE``);
- ``torchinductor/``: torch's compiler cache (``TORCHINDUCTOR_CACHE_DIR``; torch makes it on importing its
  distributed modules, under /tmp otherwise);
- ``lm_eval_tasks-<version>.json``: the names of lm-eval's installed tasks (harness.spec);
- ``pytest/`` and ``benchmarks/``: pytest's cache and pytest-benchmark's storage of a ``pytest suites/``
  session, unless the user chose other places (``-o cache_dir=...``, ``--benchmark-storage``).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "QLORA_HARNESS_CACHE"


def cache_dir(environ=None) -> Path:
    """The cache folder (see the module's docstring) under ``environ`` (default: this process's); made by whoever
    writes into it."""
    env = os.environ if environ is None else environ
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return Path(env.get(ENV) or Path(env.get("XDG_CACHE_HOME") or home / ".cache") / "qlora-harness")
