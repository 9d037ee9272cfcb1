"""The base class of a data format: which fields a row has and how it becomes one of trl's dataset formats."""

from __future__ import annotations

from typing import Any


class Format:
    """A row shape. ``fields`` are the names a row must have (after ``data.columns`` renames them)."""

    name: str = ""
    fields: tuple[str, ...] = ()
    conversational: bool = False  # rows are rendered with a chat template (trl's conversational formats)
    answers: bool = False  # rows split into a prompt and an answer (scorable as held-out questions)

    def to_trl(self, row: dict[str, Any], system_prompt: str | None, chat: bool) -> dict[str, Any]:
        """The row in one of trl's formats: ``text``, ``messages`` or ``prompt``/``completion``."""
        raise NotImplementedError

    def trainer_options(self, loss: str, chat: bool) -> dict[str, Any]:
        """SFTConfig options this format needs for ``loss`` (completion: loss on completions/assistant turns)."""
        return {}
