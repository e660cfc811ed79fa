"""Prompt templates of every step, each with a version that goes into the record ids: change a template's text and
bump its version, so records made from the old text are never mistaken for the new ones.

The paper publishes no prompts (report §2.2, App. D describe them); these are ours (ASSUMPTION), written to the
report's descriptions: the seed rubric follows App. D.1.1's metadata, the critique App. D.1.2's rubric.
"""
from __future__ import annotations

# name -> (version, system, user template). Templates use str.format fields.
TEMPLATES: dict[str, tuple[str, str, str]] = {
    "score_seed": ("v1", "You grade text passages for training a reasoning model. Answer with one JSON object only.",
                   "Rate the passage below.\n"
                   "- educational_value: 1-5, how much a student would learn from it\n"
                   "- reasoning: 1-5, how much chained reasoning (assumption -> steps -> conclusion) it contains\n"
                   "- information_type: a few words (e.g. 'worked example', 'definition', 'narrative')\n"
                   "- complexity: A (elementary), B (intermediate) or C (advanced)\n"
                   "- factual_obscurity: 1-5\n"
                   'Reply as {{"educational_value": n, "reasoning": n, "information_type": "...", '
                   '"complexity": "A|B|C", "factual_obscurity": n}}.\n\nPassage:\n"""\n{passage}\n"""'),
    "rewrite_textbook": ("v1", "You write clear, rigorous textbook material.",
                         "Rewrite the material below as a self-contained textbook section: state the idea, explain "
                         "why it holds, and work one example step by step. Do not mention the source.\n\n{passage}"),
    "rewrite_exercises": ("v1", "You write exercises with complete worked solutions.",
                          "Write two exercises that test the ideas in the material below, each followed by a full "
                          "solution that reasons step by step and ends with 'The answer is X.'\n\n{passage}"),
    "rewrite_discussion": ("v1", "You write dialogues between a curious student and a patient teacher.",
                           "Write a discussion in which a student works through the ideas below with a teacher, "
                           "making and correcting one mistake on the way.\n\n{passage}"),
    "rewrite_reasoning": ("v1", "You turn material into structured reasoning tasks.",
                          "From the material below, write one problem that needs several reasoning steps, then "
                          "solve it: list the assumptions, each step, and the conclusion.\n\n{passage}"),
    "make_question": ("v1", "You write exam questions that have one short, checkable final answer.",
                      "Write one question answerable from the material below whose answer is a number or a short "
                      "phrase. Output only the question.\n\n{passage}"),
    "answer": ("v1", "You solve problems step by step.",
               "{question}\n\nThink step by step, then end with 'The answer is X.'"),
    "critique": ("v1", "You are a strict reviewer. Answer with one JSON object only.",
                 "Review the draft below for reasoning and factual accuracy.\n"
                 'Reply as {{"reasoning": n, "factual_accuracy": n, "suggestions": ["..."]}} with scores 1-5.\n\n'
                 'Draft:\n"""\n{draft}\n"""'),
    "revise": ("v1", "You improve drafts by applying a reviewer's suggestions.",
               "Revise the draft below. Apply these suggestions: {suggestions}\nOutput only the revised text.\n\n"
               'Draft:\n"""\n{draft}\n"""'),
    "code_to_instruction": ("v1", "You write programming tasks.",
                            "Write the instruction a programmer would have been given to write the code below: what "
                            "the function is called, its arguments and what it returns. Output only the "
                            "instruction.\n\n```python\n{code}\n```"),
    "instruction_to_code": ("v1", "You write correct Python code.",
                            "{instruction}\n\nAnswer with the code in one ```python block."),
}

REWRITE_STYLES = ("textbook", "exercises", "discussion", "reasoning")


def render(name: str, templates: dict | None = None, **fields) -> tuple[str, str, str]:
    """(version, system, user) of template `name` (of `templates`, default this module's) filled with `fields`."""
    templates = TEMPLATES if templates is None else templates
    if name not in templates:
        raise KeyError(f"no prompt template {name!r}; known: {sorted(templates)}")
    version, system, user = templates[name]
    return version, system, user.format(**fields)
