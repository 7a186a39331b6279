"""PubMed XML parsing, prepare_pubmed (merge, filters, split, shards, resume) and download."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from biomamba_jax.data import pubmed
from biomamba_jax.data.pubmed import (
    DeletedCitation,
    DownloadError,
    MalformedRecord,
    PrepareError,
    PubmedFileError,
    PubmedRecord,
    download_pubmed_baseline,
    iter_pubmed_file,
    prepare_pubmed,
    split_hash,
)
from biomamba_jax.data.synthetic import write_synthetic_pubmed
from biomamba_jax.data.tokenizer import load_tokenizer

from helpers import FIXTURES, SHARED_PUBMED_RECORD, STRUCTURED_RECORD, load_script

BASELINE = FIXTURES / "pubmed" / "fixture25n0001.xml"
UPDATE = FIXTURES / "pubmed" / "fixture25n0002.xml"


def prepare(inputs, out_dir, tokenizer_path, **options):
    options = {"val_fraction": 0.0, "shard_tokens": 64, "progress": False, "command": "test", **options}
    return prepare_pubmed(inputs, out_dir, tokenizer=tokenizer_path, **options)


def split_texts(out_dir: Path, split: str, tokenizer_path: Path) -> dict[int, str]:
    """PMID -> decoded document text, read back from the shards via the documents file."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    info = manifest["splits"][split]
    if not info["shards"]:
        return {}
    stream = np.concatenate([np.load(out_dir / shard["file"]) for shard in info["shards"]])
    documents = np.load(out_dir / info["documents_file"])
    assert stream.dtype == np.uint16 and stream.size == documents[:, 1].sum() == info["tokens"]
    ends = np.cumsum(documents[:, 1])
    assert np.all(stream[ends - 1] == 0), "every document must end with EOS"
    tokenizer = load_tokenizer(tokenizer_path)
    starts = ends - documents[:, 1]
    return {
        int(pmid): tokenizer.decode(stream[start : end - 1].tolist())
        for (pmid, _), start, end in zip(documents, starts, ends)
    }


# --------------------------------------------------------------------------- parsing


def test_structured_record_parses_direct_pmid_sections_and_inline_markup():
    """A record laid out as real baseline records are (see the fixture's header)."""
    (record,) = list(iter_pubmed_file(STRUCTURED_RECORD))
    assert record.pmid == 31415926  # not the nested PMIDs 31415927, 31415999 or 27182818
    assert record.title == "Nebulised Lactobacillus Lysate and Oxygen Saturation in Children with Bronchiolitis."
    assert record.languages == ("eng",)
    sections = record.abstract.split("\n")
    assert [section.split(":")[0] for section in sections] == ["BACKGROUND", "METHODS", "RESULTS", "CONCLUSIONS"]
    # Markup broken over lines: its text kept, the indentation collapsed to one space.
    assert "saturation (Sa O2) of children with bronchiolitis, as a β 2-agonist may, is not known." in sections[0]
    assert "nebulised Lactobacillus rhamnosus lysate" in sections[1]
    assert "The mean SaO2 on day 2" in sections[2] and "above 105 per millilitre" in sections[2]
    assert "Copyright" not in record.text and "©" not in record.text
    assert record.text.startswith(record.title + "\n\nBACKGROUND: Whether a nebulised bacterial lysate")

    if SHARED_PUBMED_RECORD.is_file():  # the real record it imitates, where ../shared/data has it
        (shared,) = list(iter_pubmed_file(SHARED_PUBMED_RECORD))
        assert shared.pmid == 29768149  # not the CommentsCorrections PMIDs 29768146 / 30242404
        assert shared.title == "Inhaled Combined Budesonide-Formoterol as Needed in Mild Asthma."
        assert shared.languages == ("eng",)
        sections = shared.abstract.split("\n")
        assert [section.split(":")[0] for section in sections] == ["BACKGROUND", "METHODS", "RESULTS", "CONCLUSIONS"]
        assert "fast-acting β 2-agonist may be an alternative" in sections[0]  # <sub>2</sub> kept
        assert shared.text.startswith(shared.title + "\n\nBACKGROUND: In patients with mild asthma")


def test_fixture_records_deletions_and_malformed():
    items = list(iter_pubmed_file(BASELINE))
    records = {item.pmid: item for item in items if isinstance(item, PubmedRecord)}
    malformed = [item for item in items if isinstance(item, MalformedRecord)]
    assert sorted(records) == [1001, 1002, 1003, 1004, 1005, 1006, 1008]
    first = records[1001]
    assert first.title == "Effect of Lactobacillus on CO2 output."
    assert first.abstract == "BACKGROUND: Gut flora make CO2 and H2.\nRESULTS: Output fell by 103 units in vivo."
    assert "Copyright" not in first.text
    assert records[1002].abstract == ""
    assert records[1003].languages == ("fre",)
    assert [(m.file, m.pmid) for m in malformed] == [(BASELINE.name, None), (BASELINE.name, "12a")]
    assert "not a number" in malformed[1].reason

    update_items = list(iter_pubmed_file(UPDATE))
    assert [item for item in update_items if isinstance(item, DeletedCitation)] == [
        DeletedCitation(1005),
        DeletedCitation(5555),
    ]


def test_gzip_is_read_and_truncated_gzip_or_non_xml_is_named(tmp_path):
    payload = BASELINE.read_bytes()
    good = tmp_path / "good.xml.gz"
    good.write_bytes(gzip.compress(payload))
    assert len([i for i in iter_pubmed_file(good) if isinstance(i, PubmedRecord)]) == 7

    truncated = tmp_path / "cut.xml.gz"
    truncated.write_bytes(gzip.compress(payload)[: len(gzip.compress(payload)) // 2])
    with pytest.raises(PubmedFileError, match="cut.xml.gz"):
        list(iter_pubmed_file(truncated))

    not_xml = tmp_path / "notes.xml"
    not_xml.write_text("this is not xml at all\n")
    with pytest.raises(PubmedFileError, match="notes.xml"):
        list(iter_pubmed_file(not_xml))

    wrong_root = tmp_path / "other.xml"
    wrong_root.write_text("<html><body/></html>")
    with pytest.raises(PubmedFileError, match="other.xml.*PubmedArticleSet"):
        list(iter_pubmed_file(wrong_root))


# --------------------------------------------------------------------------- prepare


def test_prepare_applies_updates_deletions_and_counts_skips(tmp_path, tokenizer_path):
    result = prepare([UPDATE, BASELINE], tmp_path / "out", tokenizer_path)  # order given is irrelevant
    texts = split_texts(tmp_path / "out", "train", tokenizer_path)
    assert sorted(texts) == [1001, 1003, 1004, 1006, 1007]
    assert texts[1004].startswith("Revised title of record 1004.\n\nThe second version")
    assert texts[1001] == (
        "Effect of Lactobacillus on CO2 output.\n\n"
        "BACKGROUND: Gut flora make CO2 and H2.\nRESULTS: Output fell by 103 units in vivo."
    )
    assert texts[1007].endswith("OBJECTIVE: To add a record in an update.\nCONCLUSION: Updates add records.")
    manifest = result.manifest
    assert manifest["skipped"] == {
        "no_abstract": 2,  # 1002, and 1008 whose later version has no abstract
        "language": 0,
        "min_chars": 0,
        "deleted": 1,
        "deleted_unknown_pmid": 1,
        "replaced_by_later_version": 2,
        "malformed": 2,
    }
    assert {(m["file"], m["pmid"]) for m in manifest["malformed_records"]} == {(BASELINE.name, None), (BASELINE.name, "12a")}
    assert [source["name"] for source in manifest["sources"]] == [BASELINE.name, UPDATE.name]
    assert manifest["sources"][0]["sha256"] == hashlib.sha256(BASELINE.read_bytes()).hexdigest()
    assert manifest["sources"][0]["md5"] == hashlib.md5(BASELINE.read_bytes()).hexdigest()
    assert manifest["tokenizer"]["vocab_size"] == len(load_tokenizer(tokenizer_path))
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(shard["tokens"] == 64 for shard in shards[:-1])
    assert "train: 5 documents" in result.summary()


def test_prepare_language_and_min_chars_filters(tmp_path, tokenizer_path):
    result = prepare([BASELINE, UPDATE], tmp_path / "out", tokenizer_path, language="eng", min_chars=30)
    assert sorted(split_texts(tmp_path / "out", "train", tokenizer_path)) == [1001, 1004, 1007]
    assert result.manifest["skipped"]["language"] == 1  # 1003 (fre)
    assert result.manifest["skipped"]["min_chars"] == 1  # 1006 ("Short.\n\nTiny.")


def test_structured_record_goes_through_prepare(tmp_path, tokenizer_path):
    prepare([STRUCTURED_RECORD], tmp_path / "out", tokenizer_path, shard_tokens=10_000)
    (text,) = split_texts(tmp_path / "out", "train", tokenizer_path).values()
    assert text == next(iter_pubmed_file(STRUCTURED_RECORD)).text
    assert "NCT00000042" in text

    if SHARED_PUBMED_RECORD.is_file():  # the real record, where ../shared/data has it
        prepare([SHARED_PUBMED_RECORD], tmp_path / "shared", tokenizer_path, shard_tokens=10_000)
        (text,) = split_texts(tmp_path / "shared", "train", tokenizer_path).values()
        assert text.startswith("Inhaled Combined Budesonide-Formoterol as Needed in Mild Asthma.\n\nBACKGROUND:")
        assert "NCT02149199" in text


def test_bad_files_are_named_others_finish_and_manifest_needs_consent(tmp_path, tokenizer_path):
    truncated = tmp_path / "inputs" / "bad25n0003.xml.gz"
    truncated.parent.mkdir()
    whole = gzip.compress(UPDATE.read_bytes())
    truncated.write_bytes(whole[: len(whole) - 40])
    not_xml = tmp_path / "inputs" / "bad25n0004.xml"
    not_xml.write_bytes(b"\x00\x01 binary junk")
    inputs = [BASELINE, truncated, not_xml]

    with pytest.raises(PrepareError) as error:
        prepare(inputs, tmp_path / "out", tokenizer_path)
    assert "bad25n0003.xml.gz" in str(error.value) and "bad25n0004.xml" in str(error.value)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert (tmp_path / "out" / "train-00000.npy").exists()  # the good file finished

    result = prepare(inputs, tmp_path / "out", tokenizer_path, allow_failed_files=True)
    assert [f["file"] for f in result.manifest["failed_files"]] == ["bad25n0003.xml.gz", "bad25n0004.xml"]
    assert result.files_reused == 1
    assert sorted(split_texts(tmp_path / "out", "train", tokenizer_path)) == [1001, 1003, 1004, 1005, 1006, 1008]
    assert "FAILED" in result.summary()


def test_empty_result_and_all_bad_inputs_are_errors(tmp_path, tokenizer_path):
    only_letters = tmp_path / "letters.xml"
    only_letters.write_text(
        "<PubmedArticleSet><PubmedArticle><MedlineCitation><PMID>7</PMID><Article>"
        "<ArticleTitle>No abstract here</ArticleTitle></Article></MedlineCitation></PubmedArticle></PubmedArticleSet>"
    )
    with pytest.raises(PrepareError, match="No documents"):
        prepare([only_letters], tmp_path / "out1", tokenizer_path)
    junk = tmp_path / "junk.xml"
    junk.write_text("not xml")
    with pytest.raises(PrepareError, match="(?s)No input file could be read.*junk.xml"):
        prepare([junk], tmp_path / "out2", tokenizer_path)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        prepare([tmp_path / "nothing-here" / "*.xml.gz"], tmp_path / "out3", tokenizer_path)


def test_same_inputs_give_identical_bytes_with_any_worker_count(tmp_path, tokenizer_path):
    corpus = write_synthetic_pubmed(tmp_path / "corpus", n_files=3, docs_per_file=40, seed=3)
    inputs = [*corpus, BASELINE, UPDATE]
    one = prepare(inputs, tmp_path / "one", tokenizer_path, val_fraction=0.2, shard_tokens=1000, workers=1)
    two = prepare(inputs, tmp_path / "two", tokenizer_path, val_fraction=0.2, shard_tokens=1000, workers=2)
    names = sorted(path.name for path in (tmp_path / "one").glob("*.npy"))
    assert names == sorted(path.name for path in (tmp_path / "two").glob("*.npy"))
    assert len([n for n in names if n.startswith("validation-0")]) >= 1 and len(names) > 4
    for name in names + ["manifest.json"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert one.manifest == two.manifest


def test_split_membership_is_stable_when_files_are_added(tmp_path, tokenizer_path):
    first = write_synthetic_pubmed(tmp_path / "a", n_files=1, docs_per_file=60, seed=1)
    added = write_synthetic_pubmed(tmp_path / "b", n_files=1, docs_per_file=60, seed=2, first_pmid=80_000_001)

    def membership(out_dir):
        return {
            int(pmid): split
            for split in ("train", "validation")
            for pmid in np.load(out_dir / f"{split}-documents.npy")[:, 0]
        }

    prepare(first, tmp_path / "small", tokenizer_path, val_fraction=0.25)
    prepare([*first, *added], tmp_path / "large", tokenizer_path, val_fraction=0.25)
    small, large = membership(tmp_path / "small"), membership(tmp_path / "large")
    assert set(small.values()) == {"train", "validation"}
    assert all(large[pmid] == split for pmid, split in small.items())
    assert all((split_hash(pmid) < 0.25) == (split == "validation") for pmid, split in large.items())


def test_rerun_reuses_caches_and_finished_shards_and_repairs_partial_ones(tmp_path, tokenizer_path, monkeypatch):
    out = tmp_path / "out"
    first = prepare([BASELINE, UPDATE], out, tokenizer_path)
    shards = [shard["file"] for shard in first.manifest["splits"]["train"]["shards"]]
    originals = {name: (out / name).read_bytes() for name in shards}
    stamps = {name: (out / name).stat().st_mtime_ns for name in shards}

    def must_not_parse(path):
        raise AssertionError(f"{path} was parsed again although its cache is complete")

    monkeypatch.setattr(pubmed.tokenize, "iter_pubmed_file", must_not_parse)
    again = prepare([BASELINE, UPDATE], out, tokenizer_path)
    assert (again.files_parsed, again.files_reused) == (0, 2)
    assert (again.shards_written, again.shards_reused) == (0, len(shards))
    assert {name: (out / name).stat().st_mtime_ns for name in shards} == stamps

    # An interrupted run: one shard missing with its half-written temp file left over,
    # one shard truncated in place.
    (out / shards[0]).unlink()
    (out / (shards[0] + ".partial")).write_bytes(originals[shards[0]][:50])
    (out / shards[1]).write_bytes(originals[shards[1]][:-10])
    repaired = prepare([BASELINE, UPDATE], out, tokenizer_path)
    assert repaired.shards_written == 2
    assert not list(out.glob("*.partial"))
    assert {name: (out / name).read_bytes() for name in shards} == originals
    assert repaired.manifest == first.manifest


def test_prepare_script_help_and_run(tmp_path, tokenizer_path, capsys):
    script = load_script("prepare_pubmed")
    with pytest.raises(SystemExit):
        script.main(["--help"])
    assert "--val-fraction" in capsys.readouterr().out
    argv = [str(BASELINE), str(UPDATE), "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer_path),
            "--workers", "1", "--no-progress", "--language", "eng"]
    assert script.main(argv) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["command"].startswith("python scripts/prepare_pubmed.py ") and "--language eng" in manifest["command"]
    assert script.main([str(tmp_path / "missing.xml"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "missing.xml" in capsys.readouterr().err


# --------------------------------------------------------------------------- download


def _serve_baseline(tmp_path: Path) -> str:
    """A local 'NLM' folder: file 0001 with its true md5, file 0002 with a wrong one."""
    site = tmp_path / "site"
    site.mkdir()
    for number, source in ((1, BASELINE), (2, UPDATE)):
        name = f"testbase25n{number:04d}.xml.gz"
        payload = gzip.compress(source.read_bytes(), mtime=0)
        (site / name).write_bytes(payload)
        digest = hashlib.md5(payload).hexdigest() if number == 1 else "0" * 32
        (site / f"{name}.md5").write_text(f"MD5({name})= {digest}\n")
    return site.as_uri() + "/"


def test_download_verifies_md5_through_file_url(tmp_path):
    base_url = _serve_baseline(tmp_path)
    (path,) = download_pubmed_baseline(1, tmp_path / "raw", base_url=base_url, prefix="testbase25n")
    assert path.name == "testbase25n0001.xml.gz"
    assert path.read_bytes() == (tmp_path / "site" / path.name).read_bytes()
    assert len([i for i in iter_pubmed_file(path) if isinstance(i, PubmedRecord)]) == 7

    with pytest.raises(DownloadError, match=r"md5 mismatch for testbase25n0002\.xml\.gz: expected 0{32}"):
        download_pubmed_baseline(2, tmp_path / "raw", base_url=base_url, prefix="testbase25n", retries=0)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["testbase25n0001.xml.gz"]
    with pytest.raises(DownloadError, match="testbase25n0003"):
        download_pubmed_baseline(1, tmp_path / "raw", base_url=base_url, prefix="testbase25n", first=3)


def test_download_then_prepare_via_script(tmp_path, tokenizer_path):
    base_url = _serve_baseline(tmp_path)
    script = load_script("prepare_pubmed")
    out = tmp_path / "out"
    argv = ["--download", "1", "--base-url", base_url, "--file-prefix", "testbase25n", "--out", str(out),
            "--tokenizer", str(tokenizer_path), "--workers", "1", "--no-progress", "--val-fraction", "0"]
    assert script.main(argv) == 0
    assert (out / "raw" / "testbase25n0001.xml.gz").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 6
