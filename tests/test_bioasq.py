"""BioASQ loading, answer normalisation, prompt encoding, loss mask, truncation, padding, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from biomamba_jax.data.bioasq import (
    PROMPT_TEMPLATE,
    QUESTION_TYPES,
    BioASQFormatError,
    encode_example,
    format_prompt,
    load_bioasq,
    normalise_exact_answer,
    pad_batch,
)

from helpers import FIXTURES

TRAINING = FIXTURES / "bioasq" / "training_tiny.json"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    from biomamba_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path)


def write_json(path: Path, questions) -> Path:
    path.write_text(json.dumps({"questions": questions}))
    return path


def factoid(question_id="f1", **fields):
    return {"id": question_id, "type": "factoid", "body": "Which gene?", "snippets": [], "exact_answer": "CFTR", **fields}


def test_three_exact_answer_shapes_normalise_to_synonyms():
    assert normalise_exact_answer("CFTR") == ["CFTR"]
    assert normalise_exact_answer(["BCR-ABL", "BCR-ABL1", " bcr-abl kinase "]) == ["BCR-ABL", "BCR-ABL1", "bcr-abl kinase"]
    assert normalise_exact_answer([["vitamin C", "ascorbic acid", "vitamin C"]]) == ["vitamin C", "ascorbic acid"]
    with pytest.raises(BioASQFormatError, match="q9: cannot read exact_answer"):
        normalise_exact_answer({"answer": "x"}, where="q9")
    with pytest.raises(BioASQFormatError, match="empty"):
        normalise_exact_answer([" "])


def test_load_keeps_factoids_and_counts_every_type():
    bioasq = load_bioasq(TRAINING)
    assert [q.id for q in bioasq.questions] == ["q-string", "q-synonyms", "q-nested"]
    assert [q.answers for q in bioasq.questions] == [
        ("CFTR",),
        ("BCR-ABL", "BCR-ABL1", "bcr-abl kinase"),
        ("vitamin C", "ascorbic acid"),
    ]
    assert bioasq.counts == {"factoid": 3, "list": 1, "summary": 1, "yesno": 1}
    assert bioasq.summary() == "training_tiny.json: 3 factoid kept; not kept: 1 list, 1 summary, 1 yesno"
    first = bioasq.questions[0]
    assert first.context == "Cystic fibrosis is caused by mutations in the CFTR gene. The CFTR protein is a chloride channel."

    everything = load_bioasq(TRAINING, types=QUESTION_TYPES)
    assert [q.target for q in everything.questions][3:] == [
        "imatinib, dasatinib, nilotinib",
        "yes",
        "Scurvy is a disease caused by vitamin C deficiency.",
    ]


def test_example_is_prompt_then_answer_and_mask_covers_answer_and_eos_only(tokenizer):
    question = load_bioasq(TRAINING).questions[1]
    example = encode_example(question, tokenizer, max_tokens=128)
    ids, mask = example["input_ids"].tolist(), example["loss_mask"].tolist()
    prompt = format_prompt(question.body, question.context)
    assert prompt == PROMPT_TEMPLATE.format(question=question.body, context=question.context)
    assert prompt.endswith("\nAnswer:") and prompt.startswith("Question: What is the target of imatinib?\nContext: ")
    # Tokenizing in pieces gives exactly the tokens of the whole text.
    assert ids == tokenizer.encode(prompt + " BCR-ABL") + [0]
    answer_length = len(tokenizer.encode(" BCR-ABL")) + 1
    assert mask == [0] * (len(ids) - answer_length) + [1] * answer_length
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == " BCR-ABL<|endoftext|>"
    assert example["input_ids"].dtype == np.int32 and example["loss_mask"].dtype == np.int32


def test_truncation_cuts_only_the_context(tokenizer):
    question = load_bioasq(TRAINING).questions[0]
    full = encode_example(question, tokenizer, max_tokens=1000)
    context_tokens = len(tokenizer.encode(" " + question.context))
    fixed = len(full["input_ids"]) - context_tokens  # the question, the prompt's frame, the answer
    # Room for the context's first two words and no more.
    budget = fixed + len(tokenizer.encode(" Cystic fibrosis"))
    cut = encode_example(question, tokenizer, max_tokens=budget)
    assert len(full["input_ids"]) > budget and len(cut["input_ids"]) == budget
    text = tokenizer.decode(cut["input_ids"].tolist())
    assert text == ("Question: Which gene is mutated in cystic fibrosis?\nContext: Cystic fibrosis"
                    "\nAnswer: CFTR<|endoftext|>")
    assert cut["loss_mask"].sum() == full["loss_mask"].sum()
    answer_tokens = int(full["loss_mask"].sum())
    prompt_only = encode_example(question, tokenizer, max_tokens=budget - answer_tokens, with_answer=False)
    assert tokenizer.decode(prompt_only["input_ids"].tolist()).endswith("Context: Cystic fibrosis\nAnswer:")
    assert prompt_only["loss_mask"].sum() == 0 and len(prompt_only["input_ids"]) == budget - answer_tokens
    with pytest.raises(ValueError, match="question q-string: the question and answer alone take"):
        encode_example(question, tokenizer, max_tokens=fixed - 1)
    assert len(encode_example(question, tokenizer, max_tokens=fixed)["input_ids"]) == fixed  # no context at all


def test_pad_batch_right_and_left(tokenizer):
    questions = load_bioasq(TRAINING).questions
    examples = [encode_example(q, tokenizer, max_tokens=64) for q in questions[:2]]
    lengths = [len(example["input_ids"]) for example in examples]
    right = pad_batch(examples)
    assert right["input_ids"].shape == (2, max(lengths)) and right["input_ids"].dtype == np.int32
    short = int(np.argmin(lengths))
    np.testing.assert_array_equal(right["input_ids"][short, : lengths[short]], examples[short]["input_ids"])
    assert np.all(right["input_ids"][short, lengths[short] :] == 0)
    assert np.all(right["loss_mask"][short, lengths[short] :] == 0)
    assert right["attention_mask"].sum(axis=1).tolist() == lengths

    left = pad_batch(examples, padding_side="left", pad_to=70)
    assert left["input_ids"].shape == (2, 70)
    for row, example in enumerate(examples):
        np.testing.assert_array_equal(left["input_ids"][row, 70 - lengths[row] :], example["input_ids"])
        np.testing.assert_array_equal(left["loss_mask"][row, 70 - lengths[row] :], example["loss_mask"])
        assert left["loss_mask"][row, : 70 - lengths[row]].sum() == 0
    with pytest.raises(ValueError, match="shorter than the longest"):
        pad_batch(examples, pad_to=5)
    with pytest.raises(ValueError, match="padding_side"):
        pad_batch(examples, padding_side="middle")


def test_bad_files_are_named(tmp_path):
    invalid = tmp_path / "broken.json"
    invalid.write_text('{"questions": [')
    with pytest.raises(BioASQFormatError, match="broken.json: invalid JSON at line 1"):
        load_bioasq(invalid)
    no_questions = tmp_path / "other.json"
    no_questions.write_text('{"data": []}')
    with pytest.raises(BioASQFormatError, match="other.json: expected a top-level object with a 'questions' list"):
        load_bioasq(no_questions)
    unanswered = write_json(tmp_path / "golden.json", [factoid("f1"), factoid("5a7f", exact_answer=None)])
    with pytest.raises(BioASQFormatError, match="golden.json: question 5a7f: factoid question has no exact_answer"):
        load_bioasq(unanswered)
    assert load_bioasq(unanswered, require_answers=False).questions[1].answers == ()
    no_factoids = write_json(tmp_path / "yesno.json", [{"id": "y", "type": "yesno", "body": "Is it?", "exact_answer": "no"}])
    with pytest.raises(BioASQFormatError, match=r"yesno.json: no factoid questions \(found 1 yesno\)"):
        load_bioasq(no_factoids)
    bad_snippet = write_json(tmp_path / "snip.json", [factoid("s1", snippets=[{"document": "x"}])])
    with pytest.raises(BioASQFormatError, match=r"question s1: snippets\[0\] has no 'text'"):
        load_bioasq(bad_snippet)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_bioasq(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="Unknown BioASQ question type"):
        load_bioasq(TRAINING, types=("factoids",))
