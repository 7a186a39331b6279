"""BioASQ Task B questions as fine-tuning and evaluation examples.

BioMamba fine-tunes and evaluates on the factoid questions of BioASQ Task B. The paper's
splits (train / test factoid questions): 4b 327 / 161, 5b 486 / 150, 6b 618 / 161.

Files are `{"questions": [{"id", "type", "body", "snippets": [{"text", ...}],
"ideal_answer", "exact_answer"}, ...]}`. A factoid `exact_answer` is, depending on the
year, a string, a list of synonyms, or a list holding one list of synonyms;
`normalise_exact_answer` turns all three into one list of synonyms.

An example is PROMPT_TEMPLATE (question, then the snippets as context, then "Answer:")
followed by " " + the first synonym + EOS. Only the context is ever truncated to fit
`max_tokens`. Loss-mask convention: `loss_mask[i] == 1` exactly where `input_ids[i]` is
an answer token or the final EOS, i.e. a token to be predicted from `input_ids[:i]`. With
logits of shape (L, V) from inputs `input_ids`, the loss on targets `input_ids[1:]` is
weighted by `loss_mask[1:]` (`loss_mask[0]` is always 0).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from biomamba_jax.data.tokenizer import EOS_ID
from biomamba_jax.files import TextFileError, read_text

PROMPT_TEMPLATE = "Question: {question}\nContext: {context}\nAnswer:"
ANSWER_TEMPLATE = " {answer}"
PAPER_FACTOID_SPLITS = {"4b": (327, 161), "5b": (486, 150), "6b": (618, 161)}
QUESTION_TYPES = ("factoid", "list", "yesno", "summary")

# The context is tokenized on its own so it can be cut by tokens. Splitting the template
# before the space that precedes it keeps that space with the context, which is how BPE
# would have tokenized the whole string (GPT-NeoX words carry their leading space).
_PROMPT_HEAD, _context_marker, _PROMPT_TAIL = PROMPT_TEMPLATE.partition(" {context}")
assert _context_marker, "PROMPT_TEMPLATE must contain ' {context}'"


class BioASQFormatError(ValueError):
    """A BioASQ file or question is not in the expected format; the message names which."""


class ExampleTooLong(ValueError):
    """A question whose prompt and answer do not fit `max_tokens` even with no context."""

    def __init__(self, question_id: str, needed: int, max_tokens: int):
        self.question_id, self.needed, self.max_tokens = question_id, needed, max_tokens
        super().__init__(f"question {question_id}: the question and answer alone take {needed} tokens, more than "
                         f"max_tokens={max_tokens}; raise max_tokens.")


@dataclasses.dataclass(frozen=True)
class BioASQQuestion:
    id: str
    type: str
    body: str
    snippets: tuple[str, ...]
    # factoid / yesno: synonyms of the one answer; list: first synonym of each item;
    # summary (or a test file without gold): empty.
    answers: tuple[str, ...]
    ideal_answer: tuple[str, ...]

    @property
    def context(self) -> str:
        return " ".join(self.snippets)

    @property
    def target(self) -> str:
        """The text the model learns to produce after "Answer:"."""
        if self.type == "list":
            return ", ".join(self.answers)
        if self.answers:
            return self.answers[0]
        if self.ideal_answer:
            return self.ideal_answer[0]
        raise BioASQFormatError(f"question {self.id} has no answer to train on")


@dataclasses.dataclass(frozen=True)
class BioASQSet:
    path: Path
    questions: list[BioASQQuestion]  # of the requested types, in file order
    counts: dict[str, int]  # every question in the file, by type

    def summary(self) -> str:
        kept = Counter(question.type for question in self.questions)
        others = {t: n for t, n in sorted(self.counts.items()) if t not in kept}
        return (
            f"{self.path.name}: " + ", ".join(f"{n} {t}" for t, n in sorted(kept.items())) + " kept"
            + (("; not kept: " + ", ".join(f"{n} {t}" for t, n in others.items())) if others else "")
        )


def normalise_exact_answer(raw, *, where: str = "exact_answer") -> list[str]:
    """A factoid exact_answer (string, list of synonyms, or [[synonyms]]) as a list of synonyms.

    Strips whitespace, drops empty strings and duplicates, keeps order (the first synonym
    is the training target). Raises BioASQFormatError naming `where` on anything else.
    """
    if isinstance(raw, str):
        candidates = [raw]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        candidates = raw
    elif isinstance(raw, list) and raw and all(
        isinstance(item, list) and all(isinstance(s, str) for s in item) for item in raw
    ):
        # Normally one inner list; a few files list several, all of them acceptable answers.
        candidates = [synonym for item in raw for synonym in item]
    else:
        raise BioASQFormatError(f"{where}: cannot read exact_answer {raw!r}; expected a string, a list of "
                                "strings or a list holding a list of strings")
    synonyms = list(dict.fromkeys(s.strip() for s in candidates if s.strip()))
    if not synonyms:
        raise BioASQFormatError(f"{where}: exact_answer is empty")
    return synonyms


def _answers(question: dict, kind: str, where: str, require_answers: bool) -> tuple[str, ...]:
    raw = question.get("exact_answer")
    if kind == "summary":
        return ()
    if raw is None or raw == [] or raw == "":
        if require_answers:
            raise BioASQFormatError(f"{where}: {kind} question has no exact_answer; training and scoring need gold "
                                    "answers: use a BioASQ training file or a test batch's golden file "
                                    "(*_golden.json), not the test file given to participants")
        return ()
    if kind == "list":
        if not isinstance(raw, list):
            raise BioASQFormatError(f"{where}: list question's exact_answer must be a list, got {raw!r}")
        return tuple(normalise_exact_answer(item, where=where)[0] for item in raw)
    return tuple(normalise_exact_answer(raw, where=where))


def _parse_question(question, index: int, path: Path, require_answers: bool) -> BioASQQuestion:
    if not isinstance(question, dict):
        raise BioASQFormatError(f"{path}: questions[{index}] is not an object")
    question_id = question.get("id")
    where = f"{path}: question {question_id if question_id else f'#{index}'}"
    for field in ("id", "type", "body"):
        if not isinstance(question.get(field), str) or not question[field].strip():
            raise BioASQFormatError(f"{where}: missing or empty '{field}'")
    snippets = []
    for number, snippet in enumerate(question.get("snippets") or []):
        if not isinstance(snippet, dict) or not isinstance(snippet.get("text"), str):
            raise BioASQFormatError(f"{where}: snippets[{number}] has no 'text'")
        snippets.append(" ".join(snippet["text"].split()))
    ideal = question.get("ideal_answer") or []
    ideal = [ideal] if isinstance(ideal, str) else [text for text in ideal if isinstance(text, str)]
    return BioASQQuestion(
        id=question_id,
        type=question["type"],
        body=" ".join(question["body"].split()),
        snippets=tuple(dict.fromkeys(s for s in snippets if s)),  # repeated snippets add nothing
        answers=_answers(question, question["type"], where, require_answers),
        ideal_answer=tuple(ideal),
    )


def load_bioasq(
    path: str | Path, types: Sequence[str] = ("factoid",), *, require_answers: bool = True
) -> BioASQSet:
    """Questions of the given `types` from a Task B training or golden/test JSON file.

    The file may be gzipped (by its magic bytes, whatever its name) and must be UTF-8.
    Errors name the file and question id: missing file, other encodings, invalid JSON, no
    top-level `questions` list, a question without id/type/body, a kept question without
    an answer (unless `require_answers=False`, for test files without gold), or a file
    with no question of the requested types.
    """
    path = Path(path)
    unknown = set(types) - set(QUESTION_TYPES)
    if unknown:
        raise ValueError(f"Unknown BioASQ question type(s) {sorted(unknown)}; choose from {QUESTION_TYPES}.")
    if not path.is_file():
        raise FileNotFoundError(f"BioASQ file {path} does not exist.")
    try:
        document = json.loads(read_text(path))
    except TextFileError as error:
        raise BioASQFormatError(str(error)) from None
    except json.JSONDecodeError as error:
        raise BioASQFormatError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from error
    if not isinstance(document, dict) or not isinstance(document.get("questions"), list):
        raise BioASQFormatError(f"{path}: expected a top-level object with a 'questions' list (BioASQ Task B format)")
    raw_questions = document["questions"]
    counts = Counter(q.get("type", "?") if isinstance(q, dict) else "?" for q in raw_questions)
    questions = [
        _parse_question(question, index, path, require_answers)
        for index, question in enumerate(raw_questions)
        if isinstance(question, dict) and question.get("type") in types
    ]
    if not questions:
        found = ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) or "no questions"
        raise BioASQFormatError(f"{path}: no {'/'.join(types)} questions (found {found})")
    return BioASQSet(path=path, questions=questions, counts=dict(sorted(counts.items())))


def format_prompt(question: str, context: str) -> str:
    return PROMPT_TEMPLATE.format(question=question, context=context)


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_example(question: BioASQQuestion, tokenizer, max_tokens: int, *, with_answer: bool = True) -> dict[str, np.ndarray]:
    """`input_ids` and `loss_mask` (int32, same length <= max_tokens) for one question.

    with_answer=False gives the prompt alone (for generation), all of it masked out.
    The context is cut from its end to fit; question and answer are never cut: when they
    alone exceed `max_tokens`, ExampleTooLong (a ValueError) says by how much.
    """
    head = _token_ids(tokenizer, _PROMPT_HEAD.format(question=question.body))
    tail = _token_ids(tokenizer, _PROMPT_TAIL)
    answer = _token_ids(tokenizer, ANSWER_TEMPLATE.format(answer=question.target)) + [EOS_ID] if with_answer else []
    room = max_tokens - len(head) - len(tail) - len(answer)
    if room < 0:
        raise ExampleTooLong(question.id, max_tokens - room, max_tokens)
    context = _token_ids(tokenizer, " " + question.context)[:room] if question.context else []
    input_ids = head + context + tail + answer
    loss_mask = [0] * (len(input_ids) - len(answer)) + [1] * len(answer)
    return {"input_ids": np.asarray(input_ids, np.int32), "loss_mask": np.asarray(loss_mask, np.int32)}


def encode_examples(questions: Iterable[BioASQQuestion], tokenizer, max_tokens: int, *, with_answer: bool = True) -> list[dict]:
    return [encode_example(question, tokenizer, max_tokens, with_answer=with_answer) for question in questions]


def pad_batch(
    examples: Sequence[dict[str, np.ndarray]],
    *,
    padding_side: str = "right",
    pad_to: int | None = None,
    pad_id: int = EOS_ID,
) -> dict[str, np.ndarray]:
    """Stack examples into int32 (batch, length) arrays, padded with `pad_id` and loss_mask 0.

    Returns input_ids, loss_mask and attention_mask (1 on real tokens). `pad_to` fixes the
    length (for a static shape under jit); by default the longest example sets it. Left
    padding puts every prompt's end at the same column, for batched generation.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    if not examples:
        raise ValueError("pad_batch needs at least one example.")
    longest = max(len(example["input_ids"]) for example in examples)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest} tokens).")
    batch = {
        "input_ids": np.full((len(examples), length), pad_id, np.int32),
        "loss_mask": np.zeros((len(examples), length), np.int32),
        "attention_mask": np.zeros((len(examples), length), np.int32),
    }
    for row, example in enumerate(examples):
        size = len(example["input_ids"])
        columns = slice(0, size) if padding_side == "right" else slice(length - size, length)
        batch["input_ids"][row, columns] = example["input_ids"]
        batch["loss_mask"][row, columns] = example["loss_mask"]
        batch["attention_mask"][row, columns] = 1
    return batch
