"""Language-model batches from the shards written by `prepare_pubmed`, on grain.

Design: a split's shards are one token stream (documents separated by EOS). The stream
is cut into rows of `seq_len + 1` tokens, so row `r` is tokens `[r*(L+1), (r+1)*(L+1))`
and any row can be read directly from the memory-mapped shards. Each epoch visits the
rows in a fresh permutation of (seed, epoch). Host `h` of `H` takes positions h, h+H,
h+2H, ... of that permutation, so hosts are disjoint and together cover the epoch.

Row layout: `tokens[0:L]` are inputs and `tokens[1:L+1]` targets. `segment_ids` number
the documents inside a row 1, 2, 3, ...; a document's EOS carries its document's id, so
a position whose segment id differs from the next one is the last of its document. A
model that resets its state where the segment id changes never lets one abstract leak
into the next. Padding (only with `pad_final` / `drop_remainder=False`) has segment id 0
and token 0, and must be masked out of the loss.

Dropping: with `drop_remainder=True` (training) the final partial row of the stream,
the rows that do not divide evenly among hosts (a different few each epoch) and a final
partial batch are dropped, so every host runs the same number of identical-shape steps.
With `drop_remainder=False` (evaluation) nothing is dropped: the final partial row is
kept if `pad_final`, and hosts and the last batch are filled up with all-padding rows.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import sys
from pathlib import Path

import grain
import numpy as np

from biomamba_jax.data.pubmed import MANIFEST_FORMAT, MANIFEST_NAME
from biomamba_jax.data.pubmed.shards import file_digests
from biomamba_jax.data.tokenizer import EOS_ID

_PREPARE_HINT = "run scripts/prepare_pubmed.py first (or biomamba_jax.data.prepare_pubmed)"
_REPREPARE_HINT = "re-run scripts/prepare_pubmed.py into this folder to rebuild it"
_PADDING_ROW = -1


def read_manifest(data_dir: str | Path, verify: bool = False) -> dict:
    """The manifest.json of a prepared dataset, with a clear error when there is none.

    Every shard it lists must exist with the size its token count implies, so a shard
    rewritten, truncated or deleted since is refused here rather than read as garbage.
    `verify` also checks each shard's sha256 (reads every byte: slow on a large dataset).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Dataset directory {data_dir} does not exist; {_PREPARE_HINT}.")
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a finished dataset (an interrupted or failed prepare "
            f"leaves no manifest); {_PREPARE_HINT}."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {_PREPARE_HINT} again.") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} has format {found!r}, expected {MANIFEST_FORMAT!r}.")
    for split in manifest.get("splits", {}).values():
        for shard in split["shards"]:
            check_shard(data_dir, shard, verify)
    return manifest


def npy_size(tokens: int) -> int:
    """Bytes of the `.npy` file `np.save` writes for `tokens` uint16 tokens."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint16)), "fortran_order": False,
                 "shape": (tokens,)})
    return header.tell() + 2 * tokens


def check_shard(data_dir: Path, shard: dict, verify: bool = False) -> Path:
    """The shard's path, after checking it is there with the size (and, with `verify`, the
    sha256) the manifest gives it."""
    path = Path(data_dir) / shard["file"]
    if not path.is_file():
        raise FileNotFoundError(f"Shard {path} listed in the manifest is missing; {_PREPARE_HINT} again.")
    expected, actual = npy_size(shard["tokens"]), path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"Shard {path} is {actual:,} bytes but the manifest's {shard['tokens']:,} tokens make "
            f"{expected:,}: it changed after the dataset was prepared; {_REPREPARE_HINT}."
        )
    if verify and file_digests(path)["sha256"] != shard["sha256"]:
        raise ValueError(
            f"Shard {path} does not match its sha256 in the manifest (changed or corrupt since it was "
            f"written); {_REPREPARE_HINT}."
        )
    return path


class TokenStream:
    """Random access to a split's shards as one concatenated, memory-mapped uint16 array."""

    def __init__(self, data_dir: str | Path, split: str, manifest: dict | None = None):
        data_dir = Path(data_dir)
        manifest = manifest or read_manifest(data_dir)
        if split not in manifest["splits"]:
            raise KeyError(f"Split {split!r} not in {data_dir / MANIFEST_NAME}; it has {sorted(manifest['splits'])}.")
        self.shards = []
        for shard in manifest["splits"][split]["shards"]:
            path = check_shard(data_dir, shard)
            array = np.load(path, mmap_mode="r")
            if array.dtype != np.uint16 or array.shape != (shard["tokens"],):
                raise ValueError(
                    f"Shard {path} holds {array.dtype}{array.shape}, manifest says uint16 ({shard['tokens']},); "
                    f"{_PREPARE_HINT} again."
                )
            self.shards.append(array)
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])
        self.size = int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as a fresh uint16 array, across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            offset = start - self.starts[shard]
            take = min(stop - start, len(self.shards[shard]) - offset)
            pieces.append(self.shards[shard][offset : offset + take])
            start += take
            shard += 1
        return np.concatenate(pieces) if len(pieces) != 1 else np.array(pieces[0])


def segment_ids_for(tokens: np.ndarray, n_valid: int) -> np.ndarray:
    """1, 2, 3, ... per document (EOS ends its document); 0 from n_valid on (padding)."""
    ends = tokens[:n_valid] == EOS_ID
    segment_ids = np.zeros(len(tokens), np.int32)
    segment_ids[:n_valid] = 1 + np.concatenate([[0], np.cumsum(ends[:-1], dtype=np.int32)])
    return segment_ids


class PackedRows:
    """Rows of `seq_len + 1` tokens with segment ids; index -1 gives an all-padding row."""

    def __init__(self, stream: TokenStream, seq_len: int, pad_final: bool):
        self.stream = stream
        self.row_tokens = seq_len + 1
        full_rows, remainder = divmod(stream.size, self.row_tokens)
        self.num_rows = full_rows + (1 if pad_final and remainder else 0)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        tokens = np.zeros(self.row_tokens, np.int32)
        n_valid = 0
        if row != _PADDING_ROW:
            start = row * self.row_tokens
            piece = self.stream.read(start, min(start + self.row_tokens, self.stream.size))
            n_valid = len(piece)
            tokens[:n_valid] = piece
        return {"tokens": tokens, "segment_ids": segment_ids_for(tokens, n_valid)}


class _EpochPlan:
    """Which row a host reads at its i-th position: epoch permutations, host striding.

    Each epoch gives this host `positions_per_epoch` positions, a whole number of batches,
    so no batch straddles two epochs. Positions past the host's rows are padding rows.
    """

    def __init__(self, num_rows, *, batch_size, seed, shuffle, process_index, process_count, drop_remainder):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        rounding = math.floor if drop_remainder else math.ceil
        self.rows_per_host = rounding(num_rows / process_count)
        self.batches_per_epoch = rounding(self.rows_per_host / batch_size)
        self.positions_per_epoch = self.batches_per_epoch * batch_size
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        order = self._permutations.get(epoch)
        if order is None:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                order = np.arange(self.num_rows)
            # Prefetch threads can be a few epochs apart when epochs are short; keep a few.
            # Swap in a new dict rather than mutating, so concurrent readers never miss.
            recent = {e: p for e, p in self._permutations.items() if abs(e - epoch) < 4}
            self._permutations = {**recent, epoch: order}
        return order

    def row(self, position: int) -> int:
        epoch, index = divmod(position, self.positions_per_epoch)
        global_index = index * self.process_count + self.process_index
        if index >= self.rows_per_host or global_index >= self.num_rows:
            return _PADDING_ROW
        return int(self.permutation(epoch)[global_index])


class LMBatchIterator:
    """Iterator of {"tokens", "segment_ids"} int32 batches with saveable state.

    `get_state()` returns a JSON-serialisable dict; `set_state(state)` on an iterator made
    with the same arguments continues with exactly the batch that would have come next.
    """

    def __init__(self, dataset: grain.MapDataset, *, fingerprint: dict, num_batches: int | None,
                 batches_per_epoch: int, tokens_per_batch: int, read_options: grain.ReadOptions):
        self._iterator = iter(dataset.to_iter_dataset(read_options))
        self.fingerprint = fingerprint
        self.num_batches = num_batches  # None: endless
        self.batches_per_epoch = batches_per_epoch
        self.tokens_per_batch = tokens_per_batch  # this host, seq_len + 1 tokens per row

    def __iter__(self) -> LMBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        return {"loader": self.fingerprint, "grain": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        if state.get("loader") != self.fingerprint:
            raise ValueError(
                "This data iterator state belongs to a different loader (dataset, seq_len, batch size, "
                f"seed or host layout changed):\n  saved:   {state.get('loader')}\n  current: {self.fingerprint}"
            )
        self._iterator.set_state(state["grain"])


def make_lm_loader(
    data_dir: str | Path,
    split: str,
    seq_len: int,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    max_tokens: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    local_devices: int | None = None,
    drop_remainder: bool = True,
    pad_final: bool = False,
    read_options: grain.ReadOptions | None = None,
    verify: bool = False,
) -> LMBatchIterator:
    """Batches of packed rows from a prepared PubMed split (see the module docstring).

    `batch_size` is this host's rows per batch; arrays are (batch_size, seq_len + 1), or
    (local_devices, batch_size // local_devices, seq_len + 1) with `local_devices`.
    Length: `num_epochs` epochs, or until the batches of all hosts hold `max_tokens`
    training positions (batch_size * seq_len per host per batch), whichever is first;
    endless with a new permutation each epoch when neither is given.
    `process_index` / `process_count` default to jax.process_index() / process_count().
    `verify` checks every shard's sha256 against the manifest first (`read_manifest`).
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive (got {seq_len}, {batch_size}).")
    if local_devices is not None and (local_devices < 1 or batch_size % local_devices):
        raise ValueError(
            f"batch_size {batch_size} is not divisible by local_devices {local_devices}; pick a per-host batch "
            "that is a multiple of the number of local devices."
        )
    if num_epochs is not None and num_epochs < 1 or max_tokens is not None and max_tokens < 1:
        raise ValueError(f"num_epochs and max_tokens must be positive when given (got {num_epochs}, {max_tokens}).")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count}).")

    manifest = read_manifest(data_dir, verify)
    rows = PackedRows(TokenStream(data_dir, split, manifest), seq_len, pad_final)
    plan = _EpochPlan(len(rows), batch_size=batch_size, seed=seed, shuffle=shuffle, process_index=process_index,
                      process_count=process_count, drop_remainder=drop_remainder)
    if plan.batches_per_epoch == 0:
        raise ValueError(
            f"Split {split!r} of {data_dir} has {rows.stream.size:,} tokens = {len(rows)} rows of seq_len + 1 = "
            f"{seq_len + 1}, too few for one batch of {batch_size} rows on each of {process_count} host(s). "
            "Use more data, a shorter seq_len or a smaller batch."
        )

    num_batches = None
    if num_epochs is not None:
        num_batches = plan.batches_per_epoch * num_epochs
    if max_tokens is not None:
        by_tokens = math.ceil(max_tokens / (batch_size * seq_len * process_count))
        num_batches = by_tokens if num_batches is None else min(num_batches, by_tokens)
    if num_batches is not None:
        positions = num_batches * batch_size
    else:
        positions = (sys.maxsize // 2 // plan.positions_per_epoch) * plan.positions_per_epoch
    dataset = (
        grain.MapDataset.range(positions)
        .map(plan.row)
        .map(rows.__getitem__)
        .batch(batch_size, drop_remainder=True, batch_fn=functools.partial(_stack, local_devices=local_devices))
    )

    # What fixes the order of batches; num_epochs / max_tokens only cut it, so a run may
    # resume with a larger budget.
    fingerprint = {
        "dataset": hashlib.sha256(json.dumps(manifest["splits"][split], sort_keys=True).encode()).hexdigest()[:16],
        "split": split, "seq_len": seq_len, "batch_size": batch_size, "seed": seed, "shuffle": shuffle,
        "process_index": process_index, "process_count": process_count, "drop_remainder": drop_remainder,
        "pad_final": pad_final,
    }
    return LMBatchIterator(
        dataset, fingerprint=fingerprint, num_batches=num_batches, batches_per_epoch=plan.batches_per_epoch,
        tokens_per_batch=batch_size * (seq_len + 1),
        read_options=read_options or grain.ReadOptions(num_threads=4, prefetch_buffer_size=64),
    )


def _stack(examples: list[dict[str, np.ndarray]], local_devices: int | None) -> dict[str, np.ndarray]:
    batch = {key: np.stack([example[key] for example in examples]) for key in examples[0]}
    if local_devices:
        batch = {key: value.reshape(local_devices, -1, value.shape[-1]) for key, value in batch.items()}
    return batch
