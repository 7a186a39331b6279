"""scripts/evaluate.py: JAX and transformers scores agree on the same Mamba, the report and
its cache, and bad inputs named before any compute."""
import json
import math
from pathlib import Path

import pytest

from biomamba_jax.evaluation.evaluate import EvalInputError, load_sets, resolve_models
from biomamba_jax.data.tokenizer import load_tokenizer, write_byte_level_tokenizer
from torch_models import random_hf_mamba
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
evaluate_script = load_script("evaluate")

TINY = REPO / "tests" / "fixtures" / "bioasq" / "training_tiny.json"


@pytest.fixture(scope="module")
def hf_mamba(tmp_path_factory):
    """A random transformers Mamba (byte-level vocabulary, padded to 264) with tokenizer files."""
    directory = tmp_path_factory.mktemp("hf") / "mamba"
    random_hf_mamba(seed=1, vocab_size=264).save_pretrained(str(directory))
    tokenizer_json = write_byte_level_tokenizer(directory.parent / "tok" / "tokenizer.json")
    load_tokenizer(tokenizer_json).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    docs = ["Cystic fibrosis is caused by mutations in the CFTR gene.",
            "Imatinib inhibits the BCR-ABL tyrosine kinase; résumé of outcomes in 120 patients."]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def report(hf_mamba, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    argv = ["--model", f"mamba={hf_mamba}", "--bioasq", str(TINY), "--text", str(text_file),
            "--out", str(out), "--max-tokens", "96", "--batch-size", "4", "--num-beams", "3",
            "--max-answer-tokens", "4"]
    assert evaluate_script.main(argv) == 0
    return out, argv


def test_jax_and_transformers_agree_on_cross_entropy_and_perplexity(report):
    out, _ = report
    results = json.loads((out / "report.json").read_text())["results"]
    for set_name in ("bioasq:training_tiny", "text:docs"):
        jax_row, torch_row = (next(r for r in results if r["set"] == set_name and r["backend"] == backend)
                              for backend in ("jax", "torch"))
        assert jax_row["tokens"] == torch_row["tokens"] > 0
        for key in ("cross_entropy", "perplexity", "bits_per_byte"):
            assert jax_row[key] == pytest.approx(torch_row[key], rel=1e-4), (set_name, key)
        assert jax_row["bits_per_byte"] == pytest.approx(jax_row["nats"] / math.log(2) / jax_row["bytes"])
    text_row = next(r for r in results if r["set"] == "text:docs")
    assert text_row["bytes"] == sum(len(json.loads(line)["text"].encode()) for line in
                                    Path(json.loads((out / "report.json").read_text())["sets"][1]["path"]).read_text().splitlines())
    bioasq_row = next(r for r in results if r["set"] == "bioasq:training_tiny")
    assert bioasq_row["questions"] == 3 and 0 <= bioasq_row["mrr"] <= 1


def test_report_files_and_rerun_reuses_cached_results(report, capsys):
    out, argv = report
    table = (out / "report.md").read_text()
    assert "| mamba (jax) |" in table and "| mamba (torch) |" in table and "MRR" in table
    assert (out / "scores.png").stat().st_size > 1000
    caches = sorted((out / "cache").glob("*.json"))
    assert len(caches) == 4
    before = {p: p.stat().st_mtime_ns for p in caches}
    capsys.readouterr()
    assert evaluate_script.main(argv) == 0
    assert capsys.readouterr().out.count(": cached") == 4
    assert {p: p.stat().st_mtime_ns for p in caches} == before


def test_bad_inputs_are_named_before_any_compute(tmp_path, hf_mamba):
    with pytest.raises(EvalInputError, match="does not exist"):
        resolve_models([f"x={tmp_path / 'missing'}"])
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text("{}")
    with pytest.raises(EvalInputError, match="unknown model format"):
        resolve_models([f"x={tmp_path / 'odd'}"])
    with pytest.raises(EvalInputError, match="NAME=PATH"):
        resolve_models([str(hf_mamba)])
    small = tmp_path / "small"
    random_hf_mamba(vocab_size=128).save_pretrained(str(small))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (small / name).write_bytes((hf_mamba / name).read_bytes())
    with pytest.raises(EvalInputError, match="257 ids but the model has 128"):
        resolve_models([f"small={small}"])
    yesno = tmp_path / "yesno.json"
    yesno.write_text(json.dumps({"questions": [{"id": "a", "type": "yesno", "body": "Is it?", "exact_answer": "yes"}]}))
    with pytest.raises(EvalInputError, match="no factoid questions"):
        load_sets(bioasq=[str(yesno)])
    assert evaluate_script.main(["--model", f"x={tmp_path / 'missing'}", "--bioasq", str(TINY),
                                 "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_non_mamba_causal_lm_baseline_is_scored_with_torch(hf_mamba, text_file, tmp_path):
    """A GPT-2 directory (random, tiny, byte-level vocabulary) is a torch-only baseline; its
    cross-entropy must equal transformers' own loss on the same tokens."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2_dir = tmp_path / "gpt2"
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=264, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0)).eval()
    gpt2.save_pretrained(str(gpt2_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (gpt2_dir / name).write_bytes((hf_mamba / name).read_bytes())
    out = tmp_path / "eval"
    assert evaluate_script.main(["--model", f"gpt2={gpt2_dir}", "--text", str(text_file), "--out", str(out),
                                 "--max-tokens", "96", "--no-factoid"]) == 0
    (row,) = json.loads((out / "report.json").read_text())["results"]
    assert row["backend"] == "torch" and row["set"] == "text:docs"
    tokenizer = load_tokenizer(gpt2_dir / "tokenizer.json")
    nats, count = 0.0, 0
    for line in text_file.read_text().splitlines():
        ids = [0] + tokenizer(json.loads(line)["text"])["input_ids"]  # EOS opens a document
        with torch.no_grad():
            loss = gpt2(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        nats, count = nats + loss * (len(ids) - 1), count + len(ids) - 1
    assert row["tokens"] == count
    assert row["cross_entropy"] == pytest.approx(nats / count, rel=1e-4)


def test_model_given_as_hub_id_is_downloaded(hf_mamba, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: calls.append(repo_id) or str(hf_mamba))
    entries = resolve_models(["mamba=state-spaces/mamba-130m-hf"])
    assert calls == ["state-spaces/mamba-130m-hf"] and [e.backend for e in entries] == ["jax", "torch"]

    def offline(repo_id, **_):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(EvalInputError, match="Download it elsewhere"):
        resolve_models(["mamba=state-spaces/mamba-130m-hf"])
