"""Conversations (trl's conversational language-modeling format): ``messages``, a list of {role, content}."""

from harness.data.formats.base import Format


class Messages(Format):
    name = "messages"
    fields = ("messages",)
    conversational = True

    def to_trl(self, row, system_prompt, chat):
        turns = list(row["messages"])
        if system_prompt and not (turns and turns[0].get("role") == "system"):
            turns = [{"role": "system", "content": system_prompt}, *turns]
        return {"messages": turns}

    def trainer_options(self, loss, chat):
        # trl's assistant_only_loss needs a chat template with {% generation %} markers (checked before training)
        return {"assistant_only_loss": loss == "completion"}
