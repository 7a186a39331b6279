"""BioASQ fine-tuning through the shared run loop, the validation split, the batch
iterator's state, and the export of a fine-tuned run to transformers with a model card."""
import json
from pathlib import Path

import numpy as np
import pytest

from biomamba_jax.training.finetune import ExampleBatches, finetune, split_by_id
from biomamba_jax.training.config import load_run_config
from biomamba_jax.training.loop import RunError

FIXTURES = Path(__file__).parent / "fixtures" / "bioasq"
TINY = FIXTURES / "training_tiny.json"


def tiny_config(out_dir, *extra):
    return load_run_config("finetune-smoke", overrides=[
        "model.init=random", "model.preset=tiny", "model.vocab_size=264", "data.tokenizer=offline-bytes",
        f"finetune.train_files=[{TINY}]", f"finetune.eval_files=[{TINY}]", "finetune.val_fraction=0",
        "finetune.max_tokens=128", "finetune.epochs=16", "batch.global_batch_tokens=512",
        "batch.micro_batch_per_device=4", "optim.peak_lr=5e-3", "optim.warmup_steps=2",
        f"run.out_dir={out_dir}", "run.log_every=1", *extra])


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("finetune") / "run"
    summary = finetune(tiny_config(out_dir), log=lambda *_: None)
    return out_dir, summary


def test_finetuning_lowers_answer_token_loss_on_the_fixture(finetuned):
    out_dir, summary = finetuned
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    test_losses = [r["test_loss"] for r in records if "test_loss" in r]
    assert summary["final_step"] == 16 and len(test_losses) == 16  # one step and one evaluation per epoch
    assert test_losses[-1] < test_losses[0]  # trained on the very questions it is evaluated on
    assert summary["data"]["train_questions"] == 3  # the fixture's factoid questions only
    assert {"tokenizer.json", "model.safetensors", "config.json"} <= {p.name for p in (out_dir / "hf").iterdir()}


def test_export_of_the_run_loads_in_transformers_with_same_logits_and_tokens(finetuned, tmp_path):
    import torch
    from transformers import AutoTokenizer, MambaForCausalLM

    from biomamba_jax.checkpoints.load import model_from_params
    from biomamba_jax.checkpoints.runs import load_model
    from biomamba_jax.data.tokenizer import load_tokenizer
    from conversions import jax_to_torch

    out_dir, _ = finetuned
    destination = tmp_path / "export"
    assert jax_to_torch.main([str(out_dir / "checkpoints" / "16"), str(destination), "--format", "hf"]) == 0
    card = (destination / "README.md").read_text()
    assert "training_tiny.json" in card and "steps: 16 of 16" in card
    text = "Question: Which gene is mutated in cystic fibrosis?\nAnswer: CFTR"
    ours = load_tokenizer(out_dir / "tokenizer" / "tokenizer.json")(text, add_special_tokens=False)["input_ids"]
    theirs = AutoTokenizer.from_pretrained(str(destination))(text, add_special_tokens=False)["input_ids"]
    assert ours == theirs
    config, params, _ = load_model(out_dir / "checkpoints" / "16", dtype="float32")
    jax_logits = np.asarray(model_from_params(config, params)(np.asarray([ours], np.int32)))
    with torch.no_grad():
        torch_logits = MambaForCausalLM.from_pretrained(str(destination))(torch.tensor([ours])).logits.numpy()
    np.testing.assert_allclose(torch_logits[..., :config.vocab_size], jax_logits, rtol=1e-4, atol=1e-4)


def test_validation_split_is_by_question_id_and_never_empty():
    from biomamba_jax.data.bioasq import load_bioasq

    questions = load_bioasq(FIXTURES / "synthetic_train.json").questions
    train, val = split_by_id(questions, 0.2)
    again_train, again_val = split_by_id(list(reversed(questions)), 0.2)
    assert {q.id for q in val} == {q.id for q in again_val} and 5 <= len(val) <= 35
    assert not {q.id for q in train} & {q.id for q in val}
    assert len(split_by_id(questions[:2], 0.01)[1]) == 1


def test_example_batches_resume_and_pad_the_last_batch():
    examples = {"tokens": np.arange(10)[:, None] + 1, "loss_mask": np.ones((10, 1), np.float32)}
    straight = ExampleBatches(examples, global_rows=4, seed=0)
    batches = [next(straight) for _ in range(5)]
    assert straight.steps_per_epoch == 3 and batches[2]["loss_mask"][2:].sum() == 0  # 10 = 4 + 4 + 2
    assert sorted(np.concatenate([b["tokens"][:, 0] for b in batches[:3]]).tolist()) == [0, 0] + list(range(1, 11))
    resumed = ExampleBatches(examples, global_rows=4, seed=0)
    partial = ExampleBatches(examples, global_rows=4, seed=0)
    [next(partial) for _ in range(2)]
    resumed.set_state(partial.get_state())
    np.testing.assert_array_equal(next(resumed)["tokens"], batches[2]["tokens"])
    with pytest.raises(RunError, match="same finetune.train_files"):
        resumed.set_state({"epoch": 0, "position": 0, "count": 7})


def test_bad_finetune_inputs_are_named(tmp_path):
    no_factoid = tmp_path / "yesno.json"
    no_factoid.write_text(json.dumps({"questions": [{"id": "a", "type": "yesno", "body": "Is it?",
                                                     "exact_answer": "yes"}]}))
    with pytest.raises(RunError, match="no factoid questions"):
        finetune(tiny_config(tmp_path / "a", f"finetune.train_files=[{no_factoid}]"), log=lambda *_: None)
    with pytest.raises(RunError, match="257 ids but the model has 64"):
        finetune(tiny_config(tmp_path / "b", "model.vocab_size=64"), log=lambda *_: None)


def test_early_stopping_keeps_and_exports_the_best_checkpoint(tmp_path):
    # lr 0: the validation loss never improves after the first evaluation, so patience 1 stops at epoch 2.
    summary = finetune(tiny_config(tmp_path / "run", "optim.peak_lr=0.0", "finetune.val_fraction=0.4",
                                   "finetune.patience=1", "finetune.epochs=5"), log=lambda *_: None)
    assert summary["stopped_by"].startswith("early stopping")
    assert summary["final_step"] == 2 and summary["best_step"] == 1 and summary["exported_step"] == 1
    assert (tmp_path / "run" / "hf" / "model.safetensors").exists()


def test_a_resumed_fine_tune_still_exports_its_best_checkpoint(tmp_path):
    """Keep 1 plus the best, stop after 2 epochs, resume: the best (epoch 1, lr 0) was
    written by the first process and must survive the second's saves to be exported."""
    settings = ("optim.peak_lr=0.0", "finetune.val_fraction=0.4", "finetune.patience=3", "finetune.epochs=8",
                "run.checkpoint_every=1", "run.keep_checkpoints=1")
    first = finetune(tiny_config(tmp_path / "run", *settings, "run.stop_at=2"), log=lambda *_: None)
    assert first["final_step"] == 2 and "exported_step" not in first
    summary = finetune(tiny_config(tmp_path / "run", *settings), resume=True, log=lambda *_: None)
    assert summary["stopped_by"].startswith("early stopping") and summary["final_step"] == 4
    assert summary["best_step"] == 1 and summary["exported_step"] == 1
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [1, 4]
