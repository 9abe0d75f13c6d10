"""Training prompt templates: the SM70 unified template (defined here and nowhere else) and medAlpaca's for the
template ablation. `render(entry)` -> (prompt, answer); the loss is on the answer only.
"""
from __future__ import annotations

from dataclasses import dataclass

from .entries import Entry

MEDALPACA_PRIMER = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                    "Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class PromptTemplate:
    """A named training template. `text` is the template as recorded with a run; `render(entry)` returns
    (prompt, answer) whose concatenation is the full training text (loss only on the answer)."""

    name: str
    text: str

    def render(self, e: Entry) -> tuple[str, str]:
        instruction, context, output = e.instruction.strip(), e.input.strip(), e.output.strip()
        if self.name == "sm70":
            body = " ".join(p for p in (context, instruction) if p)
            return f"Question: {body}\nAnswer:", f" {output}"
        if self.name == "medalpaca":
            return (f"{MEDALPACA_PRIMER}\n\n### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n",
                    output)
        raise ValueError(f"template {self.name!r} has no renderer; known: {sorted(TEMPLATES)}")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "text": self.text}


# The SM70 unified template, defined here and nowhere else. <context> is the entry's `input` (Alpaca: "an input that
# provides further context"; the abstract for PubMedQA), <instruction or question> its `instruction`; empty parts and
# their separating space are left out; fields are stripped; the answer continues after "Answer:" with one space.
SM70_TEMPLATE = PromptTemplate("sm70", "Question: {context} {instruction}\nAnswer: {output}")
# medAlpaca's Alpaca-style template (medalpaca/handler.py in kbressem/medAlpaca), for the template ablation.
MEDALPACA_TEMPLATE = PromptTemplate(
    "medalpaca", MEDALPACA_PRIMER + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}")
TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (SM70_TEMPLATE, MEDALPACA_TEMPLATE)}


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]
