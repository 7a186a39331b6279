"""The grain LM loader: coverage per epoch, segment ids, host sharding, resume, shapes, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from biomamba_jax.data.loader import make_lm_loader, read_manifest
from biomamba_jax.data.pubmed import prepare_pubmed
from biomamba_jax.data.synthetic import write_synthetic_pubmed

SEQ_LEN = 31


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer_path) -> Path:
    root = tmp_path_factory.mktemp("loader")
    corpus = write_synthetic_pubmed(root / "xml", n_files=2, docs_per_file=40, seed=7)
    # An odd shard size, so that rows straddle shard boundaries.
    prepare_pubmed(corpus, root / "data", tokenizer=tokenizer_path, val_fraction=0.2, shard_tokens=997,
                   progress=False, command="test")
    return root / "data"


def split_stream(data_dir: Path, split: str) -> np.ndarray:
    manifest = read_manifest(data_dir)
    return np.concatenate([np.load(data_dir / shard["file"]) for shard in manifest["splits"][split]["shards"]])


def loader(data_dir, split="train", batch_size=4, **options):
    options = {"process_index": 0, "process_count": 1, **options}
    return make_lm_loader(data_dir, split, SEQ_LEN, batch_size, **options)


def rows_of(batches) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (tokens, segments)
        for batch in batches
        for tokens, segments in zip(batch["tokens"].reshape(-1, SEQ_LEN + 1), batch["segment_ids"].reshape(-1, SEQ_LEN + 1))
    ]


def valid_tokens(rows) -> Counter:
    """Multiset of the rows' non-padding tokens, as bytes (padding: segment id 0)."""
    return Counter(tokens[segments > 0].astype(np.uint16).tobytes() for tokens, segments in rows if (segments > 0).any())


def expected_rows(stream: np.ndarray, include_partial: bool) -> Counter:
    width = SEQ_LEN + 1
    cut = len(stream) if include_partial else len(stream) // width * width
    return Counter(stream[start : min(start + width, cut)].tobytes() for start in range(0, cut, width))


def test_every_token_once_per_epoch_and_a_new_order_each_epoch(data_dir):
    stream = split_stream(data_dir, "train")
    full_rows = len(stream) // (SEQ_LEN + 1)
    epochs = list(loader(data_dir, batch_size=1, num_epochs=2, seed=5))
    assert len(epochs) == 2 * full_rows
    first, second = rows_of(epochs[:full_rows]), rows_of(epochs[full_rows:])
    assert valid_tokens(first) == expected_rows(stream, include_partial=False)
    assert valid_tokens(second) == expected_rows(stream, include_partial=False)
    assert [t.tobytes() for t, _ in first] != [t.tobytes() for t, _ in second]
    batch = epochs[0]
    assert batch["tokens"].dtype == np.int32 and batch["segment_ids"].dtype == np.int32
    assert batch["tokens"].shape == (1, SEQ_LEN + 1)


def test_validation_keeps_final_partial_row_as_padding(data_dir):
    stream = split_stream(data_dir, "validation")
    assert len(stream) % (SEQ_LEN + 1), "fixture should leave a partial final row"
    batches = list(loader(data_dir, "validation", batch_size=4, num_epochs=1, drop_remainder=False, pad_final=True))
    rows = rows_of(batches)
    assert valid_tokens(rows) == expected_rows(stream, include_partial=True)
    assert sum(int((segments > 0).sum()) for _, segments in rows) == len(stream)
    for tokens, segments in rows:
        assert np.all(tokens[segments == 0] == 0)
    assert all(batch["tokens"].shape == (4, SEQ_LEN + 1) for batch in batches)


def test_segment_ids_number_documents_and_eos_closes_its_document(data_dir):
    rows = rows_of(loader(data_dir, batch_size=8, num_epochs=1))
    assert any(len(set(segments.tolist())) > 1 for _, segments in rows)
    for tokens, segments in rows:
        expected, current = [], 1
        for token in tokens:
            expected.append(current)
            current += token == 0
        assert segments.tolist() == expected


@pytest.mark.parametrize("process_count", [2, 3])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_hosts_are_disjoint_and_cover_the_epoch(data_dir, process_count, drop_remainder):
    stream = split_stream(data_dir, "train")
    n_rows = len(stream) // (SEQ_LEN + 1)
    per_host = [
        rows_of(loader(data_dir, batch_size=2, num_epochs=1, seed=3, drop_remainder=drop_remainder,
                       process_index=index, process_count=process_count))
        for index in range(process_count)
    ]
    assert len({len(rows) for rows in per_host}) == 1, "every host must run the same number of steps"
    # Rows of the synthetic corpus are distinct, so bytes identify a row.
    seen = [valid_tokens(rows) for rows in per_host]
    union = sum(seen, Counter())
    assert all(count == 1 for count in union.values()), "a row reached two hosts"
    if drop_remainder:
        assert set(union) <= set(expected_rows(stream, include_partial=False))
        assert n_rows - sum(union.values()) < process_count * 2
    else:
        assert union == expected_rows(stream, include_partial=False)


def test_save_and_restore_continues_with_identical_batches(data_dir):
    original = loader(data_dir, batch_size=3, seed=11)  # endless: crosses epoch boundaries
    epoch_batches = original.batches_per_epoch
    for _ in range(epoch_batches - 2):
        next(original)
    state = json.loads(json.dumps(original.get_state()))
    expected = [next(original) for _ in range(5)]

    resumed = loader(data_dir, batch_size=3, seed=11)
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(5))):
        np.testing.assert_array_equal(want["tokens"], got["tokens"])
        np.testing.assert_array_equal(want["segment_ids"], got["segment_ids"])

    with pytest.raises(ValueError, match="different loader"):
        loader(data_dir, batch_size=3, seed=12).set_state(state)


def test_local_devices_reshape_and_bad_split(data_dir):
    plain = next(loader(data_dir, batch_size=4, seed=2))
    devices = next(loader(data_dir, batch_size=4, seed=2, local_devices=2))
    assert devices["tokens"].shape == (2, 2, SEQ_LEN + 1)
    np.testing.assert_array_equal(devices["tokens"].reshape(4, -1), plain["tokens"])
    np.testing.assert_array_equal(devices["segment_ids"].reshape(4, -1), plain["segment_ids"])
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by local_devices 4"):
        loader(data_dir, batch_size=6, local_devices=4)


def test_token_budget_and_epoch_budget(data_dir):
    budget = loader(data_dir, batch_size=2, max_tokens=1000)
    assert budget.num_batches == int(np.ceil(1000 / (2 * SEQ_LEN)))
    assert len(list(budget)) == budget.num_batches
    both = loader(data_dir, batch_size=2, max_tokens=10**9, num_epochs=1)
    assert len(list(both)) == both.batches_per_epoch


def test_errors_name_the_problem_and_the_fix(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="run scripts/prepare_pubmed.py first"):
        make_lm_loader(tmp_path / "absent", "train", 8, 2, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="manifest.json not found.*prepare_pubmed"):
        read_manifest(tmp_path)
    with pytest.raises(KeyError, match="'test' not in"):
        loader(data_dir, "test")
    with pytest.raises(ValueError, match="too few for one batch"):
        make_lm_loader(data_dir, "validation", 4096, 8, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="outside"):
        loader(data_dir, process_index=2, process_count=2)


def test_process_defaults_come_from_jax(data_dir):
    import jax

    iterator = make_lm_loader(data_dir, "train", SEQ_LEN, 2)
    assert iterator.get_state()["loader"]["process_count"] == jax.process_count()
