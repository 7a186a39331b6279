"""scripts/evaluate.py: JAX and transformers scores agree on the same Mamba, the report and
its cache, and bad inputs named before any compute."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

from biomamba_jax.evaluate import EvalInputError, load_sets, resolve_models
from biomamba_jax.tokenizer import load_tokenizer, write_byte_level_tokenizer
from torch_models import random_hf_mamba

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
evaluate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_script)

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
