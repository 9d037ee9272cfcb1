"""Plain text rows (trl's language-modeling format): the loss is on every token."""

from harness.data.formats.base import Format


class Text(Format):
    name = "text"
    fields = ("text",)

    def to_trl(self, row, system_prompt, chat):
        return {"text": row["text"]}

    def trainer_options(self, loss, chat):
        return {"completion_only_loss": False}
