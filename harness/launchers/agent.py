"""torch's own launcher (``torch.distributed.run``) as a case's worker: it ends itself with its parent.

``python -m harness.launchers.agent <torchrun arguments>``: the harness's parent-death guard, then torchrun's
``main``. Its ranks watch this process (``QLORA_HARNESS_PARENT_PID`` is set to it), so a kill of the harness,
of this agent or of a rank ends every process of the case; torchrun itself stops the other ranks when one fails.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.run import main as torchrun

    from harness.worker import PARENT_ENV, _guard_parent

    _guard_parent()  # watches the harness process that started this agent
    os.environ[PARENT_ENV] = str(os.getpid())  # each rank watches this agent
    torchrun(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
