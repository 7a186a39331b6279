"""Helpers shared by the tests: rel_err, where test data lives, a locally trained tokenizer."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module, so tests call its `main` in process (a subprocess
    would spend longer importing JAX than the test runs)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Read-only reference data next to the repository (`<repo>/../shared/data`); a fresh clone
# elsewhere has none. BIOMAMBA_SHARED_DATA points the tests at another folder, e.g.
# BIOMAMBA_SHARED_DATA=/nonexistent to check what a fresh clone runs.
SHARED_DATA = Path(os.environ.get("BIOMAMBA_SHARED_DATA") or REPO.parent / "shared" / "data")
NEOX_TOKENIZER_JSON = SHARED_DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
SHARED_PUBMED_RECORD = SHARED_DATA / "pubmed" / "pubmed-29768149.xml"

# The project's own structured record, with the features of the shared one.
STRUCTURED_RECORD = FIXTURES / "pubmed" / "structured-record.xml"


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64: the relative error every tolerance in the suite means."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _training_texts() -> list[str]:
    """A few KB of biomedical text: the fixtures' abstracts and BioASQ questions, plus
    synthetic abstracts, so that the words the tests use get merges of their own."""
    import tempfile

    from biomamba_jax.data.pubmed import PubmedRecord, iter_pubmed_file
    from biomamba_jax.data.synthetic import write_synthetic_pubmed

    with tempfile.TemporaryDirectory() as synthetic:
        paths = [*sorted((FIXTURES / "pubmed").glob("*.xml")),
                 *write_synthetic_pubmed(synthetic, n_files=1, docs_per_file=20, seed=0)]
        texts = [item.text for path in paths for item in iter_pubmed_file(path) if isinstance(item, PubmedRecord)]
    for question in json.loads((FIXTURES / "bioasq" / "training_tiny.json").read_text())["questions"]:
        texts.append(question["body"])
        texts.extend(snippet["text"] for snippet in question.get("snippets", []))
    return texts


def write_local_bpe_tokenizer(path: str | Path, vocab_size: int = 1000) -> Path:
    """Train a byte-level BPE tokenizer laid out as GPT-NeoX's (`<|endoftext|>` = 0, byte-level
    pre-tokenizer without prefix space, every byte reachable) on `_training_texts`.

    Tests that need a real subword tokenizer but not GPT-NeoX's exact ids use it when
    ../shared/data is absent; it takes well under a second to train.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from biomamba_jax.data.tokenizer import EOS_TOKEN

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_training_texts(), trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def scan_with_resets(u, delta, A, B, C, D, z, delta_bias, initial_state, resets):
    """A softplus selective scan with document resets (bool (B, L)), gated, in fp32 as
    `selective_scan`'s reference does, with the resets contract written out: the state entering a reset token is zeroed (so a
    reset at position 0 drops the initial state), then the usual step."""
    import jax  # the other helpers need no JAX
    import jax.numpy as jnp

    delta = jax.nn.softplus(delta.astype(jnp.float32) + delta_bias)
    u32 = u.astype(jnp.float32)

    def step(state, inputs):
        u_t, delta_t, B_t, C_t, reset_t = inputs
        state = jnp.where(reset_t[:, None, None], 0.0, state)
        state = jnp.exp(delta_t[..., None] * A) * state + (delta_t * u_t)[..., None] * B_t[:, None, :]
        return state, jnp.einsum("ben,bn->be", state, C_t)

    time_major = [jnp.swapaxes(t, 0, 1) for t in (u32, delta, B.astype(jnp.float32), C.astype(jnp.float32), resets)]
    final, y = jax.lax.scan(step, initial_state, time_major)
    y = (jnp.swapaxes(y, 0, 1) + u32 * D) * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(u.dtype), final


def recurrence_inputs(seed: int, batch: int, length: int, channels: int, d_state: int) -> tuple:
    """Random fp32 (u, delta, A, B, C, initial_state) for the recurrence impls in SCAN_IMPLS:
    delta positive and mostly small, A negative, so the scan stays stable."""
    import jax  # the other helpers need no JAX
    import jax.numpy as jnp

    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    return (
        jax.random.normal(k[0], (batch, length, channels)),
        jax.nn.softplus(jax.random.normal(k[1], (batch, length, channels)) - 1.0),
        -jnp.exp(jax.random.normal(k[2], (channels, d_state)) * 0.5),
        jax.random.normal(k[3], (batch, length, d_state)),
        jax.random.normal(k[4], (batch, length, d_state)),
        jax.random.normal(k[5], (batch, channels, d_state)),
    )
