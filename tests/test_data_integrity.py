"""Prepared data you can trust: prepare_pubmed never leaves a manifest that describes
other shards, the loader refuses shards that changed since (by size always, by sha256 on
request), and the smoke preset writes its synthetic corpus only where nothing else lives.
New names are imported inside the tests that use them, so each test fails on its own on
code without the fix."""
import json
from pathlib import Path

import pytest

from biomamba_jax.data import PrepareError, make_lm_loader, prepare_pubmed, read_manifest, write_synthetic_pubmed
from biomamba_jax.data.tokenizer import write_byte_level_tokenizer
from biomamba_jax.training.config import load_run_config
from biomamba_jax.training.loop import RunError
from helpers import load_script

SHARD_TOKENS = 3000  # several shards per split from a few small files


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    tokenizer = write_byte_level_tokenizer(root / "tok" / "tokenizer.json")
    first = write_synthetic_pubmed(root / "a", n_files=2, docs_per_file=20)
    other = write_synthetic_pubmed(root / "b", n_files=1, docs_per_file=20, first_pmid=80_000_001)
    broken = root / "broken.xml.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    return {"tokenizer": str(tokenizer), "first": first, "other": other, "broken": broken}


def _prepare(sources, files, out, **kwargs):
    return prepare_pubmed(files, out, tokenizer=sources["tokenizer"], progress=False, shard_tokens=SHARD_TOKENS,
                          val_fraction=0.2, **kwargs)


@pytest.fixture
def dataset(sources, tmp_path):
    out = tmp_path / "data"
    _prepare(sources, sources["first"], out)
    return out


def _first_shard(dataset: Path) -> Path:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return dataset / manifest["splits"]["train"]["shards"][0]["file"]


# ---------------------------------------------------------------- prepare_pubmed
def test_failed_run_that_changes_shards_leaves_no_stale_manifest(sources, dataset):
    before = {p.name: p.read_bytes() for p in dataset.glob("train-0*.npy")}
    with pytest.raises(PrepareError, match="could not be read"):
        _prepare(sources, [sources["first"][0], sources["other"][0], sources["broken"]], dataset)
    assert {p.name: p.read_bytes() for p in dataset.glob("train-0*.npy")} != before  # the run did rewrite shards
    assert not (dataset / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="is not a finished dataset"):
        read_manifest(dataset)


def test_failed_run_that_changes_nothing_keeps_the_manifest(sources, dataset):
    manifest = (dataset / "manifest.json").read_text()
    with pytest.raises(PrepareError, match="could not be read"):
        _prepare(sources, [*sources["first"], sources["broken"]], dataset)
    assert (dataset / "manifest.json").read_text() == manifest
    read_manifest(dataset, verify=True)


def test_every_input_failing_leaves_no_folder_it_created(sources, tmp_path):
    with pytest.raises(PrepareError, match="No input file could be read"):
        _prepare(sources, [sources["broken"]], tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(PrepareError, match="No input file could be read"):
        _prepare(sources, [sources["broken"]], tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()  # a folder the run did not create is the user's


def test_cli_all_inputs_failing_exits_1_and_leaves_nothing(sources, tmp_path, capsys):
    code = load_script("prepare_pubmed").main([str(sources["broken"]), "--out", str(tmp_path / "out"), "--workers", "1",
                                           "--tokenizer", sources["tokenizer"], "--no-progress"])
    assert code == 1 and "No input file could be read" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------- loader
@pytest.mark.parametrize("change", ["truncate", "append"])
def test_loader_refuses_a_shard_whose_size_differs_from_the_manifest(dataset, change):
    shard = _first_shard(dataset)
    data = shard.read_bytes()
    shard.write_bytes(data[:-10] if change == "truncate" else data + b"\x00\x00")
    for read in (lambda: read_manifest(dataset),
                 lambda: make_lm_loader(dataset, "train", 16, 2, process_index=0, process_count=1)):
        with pytest.raises(ValueError) as caught:
            read()
        message = str(caught.value)
        assert message.startswith(f"Shard {shard} is {len(data) + (-10 if change == 'truncate' else 2):,} bytes")
        assert "prepare_pubmed" in message and "\n" not in message


def test_verify_checks_every_shards_sha256(dataset):
    shard = _first_shard(dataset)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, different tokens
    shard.write_bytes(bytes(data))
    read_manifest(dataset)  # sizes agree: only a checksum can tell
    with pytest.raises(ValueError, match=f"Shard {shard} does not match its sha256 in the manifest.*prepare_pubmed"):
        read_manifest(dataset, verify=True)
    with pytest.raises(ValueError, match="does not match its sha256"):
        make_lm_loader(dataset, "train", 16, 2, process_index=0, process_count=1, verify=True)


def test_prepare_pubmed_cli_verify(dataset, capsys):
    script = load_script("prepare_pubmed")
    assert script.main(["--verify", "--out", str(dataset)]) == 0
    assert "sizes and sha256 match" in capsys.readouterr().out
    shard = _first_shard(dataset)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert script.main(["--verify", "--out", str(dataset)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"Shard {shard} does not match its sha256" in err
    with pytest.raises(SystemExit):
        script.main(["--verify", "--out", str(dataset), "more.xml"])
    assert "--verify checks the dataset already in --out" in capsys.readouterr().err


def test_run_config_data_verify_is_used_by_the_pretraining_check(dataset):
    from biomamba_jax.training.pretrain import _check_data

    shard = _first_shard(dataset)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    config = load_run_config("smoke", overrides=[f"data.dir={dataset}", "data.synthetic_files=0"])
    assert config.data.verify is False
    _check_data(config, vocab_size=264)
    verified = load_run_config("smoke", overrides=[f"data.dir={dataset}", "data.synthetic_files=0", "data.verify=true"])
    with pytest.raises(RunError, match="does not match its sha256"):
        _check_data(verified, vocab_size=264)


def test_pretraining_check_reports_a_changed_shard_as_a_run_error(dataset):
    from biomamba_jax.training.pretrain import _check_data

    shard = _first_shard(dataset)
    shard.write_bytes(shard.read_bytes()[:-4])
    config = load_run_config("smoke", overrides=[f"data.dir={dataset}", "data.synthetic_files=0"])
    with pytest.raises(RunError, match=f"Shard {shard} is"):
        _check_data(config, vocab_size=264)


# ------------------------------------------------------------------ smoke data
def _smoke(data_dir, out_dir, *extra):
    return load_run_config("smoke", overrides=[f"data.dir={data_dir}", f"run.out_dir={out_dir}",
                                               "data.synthetic_files=1", "data.synthetic_docs_per_file=8", *extra])


def test_smoke_data_refuses_a_non_empty_folder_that_is_not_its_own(tmp_path):
    from biomamba_jax.training.pretrain import _prepare_synthetic_data

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    with pytest.raises(RunError, match=f"data.dir {mine} is not empty and holds no dataset.*data.synthetic_files=0"):
        _prepare_synthetic_data(_smoke(mine, tmp_path / "run"), log=lambda *_: None)
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]


def test_smoke_data_fills_a_new_or_empty_folder_and_completes_its_own(tmp_path):
    from biomamba_jax.training.pretrain import SYNTHETIC_MARKER, _prepare_synthetic_data

    (tmp_path / "empty").mkdir()
    for data_dir in (tmp_path / "new" / "data", tmp_path / "empty"):
        _prepare_synthetic_data(_smoke(data_dir, tmp_path / "run"), log=lambda *_: None)
        assert (data_dir / SYNTHETIC_MARKER).is_file()
        read_manifest(data_dir, verify=True)
    # An interrupted generation (marker, no manifest) is ours: it is completed, not refused.
    partial = tmp_path / "new" / "data"
    (partial / "manifest.json").unlink()
    _prepare_synthetic_data(_smoke(partial, tmp_path / "run"), log=lambda *_: None)
    read_manifest(partial)


def test_smoke_reads_a_prepared_dataset_it_did_not_make_without_writing(dataset, tmp_path):
    from biomamba_jax.training.pretrain import _prepare_synthetic_data

    before = sorted(p.name for p in dataset.iterdir())
    logged = []
    _prepare_synthetic_data(_smoke(dataset, tmp_path / "run"), log=logged.append)
    assert sorted(p.name for p in dataset.iterdir()) == before
    assert any("holds a prepared dataset" in line for line in logged)


def test_pretrain_cli_data_dir_means_real_data(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    code = load_script("pretrain").main(["--preset", "smoke", "--data-dir", str(missing),
                                     f"run.out_dir={tmp_path / 'run'}", "run.steps=1", "run.export_hf=false"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"data dir {missing} does not exist: run scripts/prepare_pubmed.py" in err
    assert not missing.exists()
