"""Question and answer columns: a user turn and an assistant turn (with a chat template), else prompt-completion text.

Rendered as trl's (conversational) prompt-completion format, so ``loss: completion`` is trl's completion_only_loss.
"""

from harness.data.formats.base import Format


class QuestionAnswer(Format):
    name = "qa"
    fields = ("question", "answer")
    answers = True

    def to_trl(self, row, system_prompt, chat):
        q, a = str(row["question"]), str(row["answer"])
        if chat:
            system = [{"role": "system", "content": system_prompt}] if system_prompt else []
            return {"prompt": [*system, {"role": "user", "content": q}],
                    "completion": [{"role": "assistant", "content": a}]}
        head = f"{system_prompt}\n\n" if system_prompt else ""
        return {"prompt": f"{head}{q}\n", "completion": a}

    def trainer_options(self, loss, chat):
        return {"completion_only_loss": loss == "completion"}
