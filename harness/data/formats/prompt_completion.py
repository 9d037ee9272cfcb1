"""Prompt and completion columns (trl's prompt-completion format), plain strings or conversational lists."""

from harness.data.formats.base import Format


class PromptCompletion(Format):
    name = "prompt-completion"
    fields = ("prompt", "completion")
    answers = True

    def to_trl(self, row, system_prompt, chat):
        prompt, completion = row["prompt"], row["completion"]
        if chat and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
            completion = [{"role": "assistant", "content": completion}]
        if chat and system_prompt and prompt[0].get("role") != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        elif not chat and system_prompt:
            prompt = f"{system_prompt}\n\n{prompt}"
        return {"prompt": prompt, "completion": completion}

    def trainer_options(self, loss, chat):
        return {"completion_only_loss": loss == "completion"}
