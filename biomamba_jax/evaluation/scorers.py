"""Scoring one model on one set: the scored rows for its tokenizer, negative log-likelihood
by the JAX model or by transformers/torch, and beam-search factoid answers."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import metrics
from biomamba_jax.data.tokenizer import EOS_ID

from biomamba_jax.evaluation.inputs import EvalSet, EvalSettings, ModelEntry


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    return EOS_ID if eos is None else int(eos)


def scored_rows(eval_set: EvalSet, tokenizer, max_tokens: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """([(token ids, loss mask over the ids)], scored UTF-8 bytes) for one tokenizer.

    mask[i] = 1 where ids[i] is scored (predicted from ids[:i]); mask[0] is always 0.
    """
    from biomamba_jax.data.bioasq import ANSWER_TEMPLATE, encode_example

    eos, rows, n_bytes = _eos_id(tokenizer), [], 0
    if eval_set.kind == "bioasq":
        for question in eval_set.items:
            example = encode_example(question, tokenizer, max_tokens)
            ids = example["input_ids"].copy()
            ids[-1] = eos  # encode_example ends with Mamba's EOS id; other tokenizers have their own
            rows.append((ids, example["loss_mask"]))
            n_bytes += len(ANSWER_TEMPLATE.format(answer=question.target).encode("utf-8"))
        return rows, n_bytes
    for document in eval_set.items:
        ids = np.asarray([eos] + tokenizer(document, add_special_tokens=False)["input_ids"], np.int32)
        # Windows of max_tokens targets, each with the previous token as its first input.
        for start in range(0, len(ids) - 1, max_tokens):
            window = ids[start:start + max_tokens + 1]
            mask = np.ones(len(window), np.int32)
            mask[0] = 0
            rows.append((window, mask))
        n_bytes += len(document.encode("utf-8"))
    return rows, n_bytes


def _batches(rows, batch_size: int, length: int):
    """Fixed (batch_size, length) right-padded arrays: ids, loss mask, attention mask."""
    for start in range(0, len(rows), batch_size):
        ids = np.zeros((batch_size, length), np.int32)
        loss = np.zeros((batch_size, length), np.float32)
        attention = np.zeros((batch_size, length), np.int32)
        for row, (token_ids, mask) in enumerate(rows[start:start + batch_size]):
            ids[row, :len(token_ids)], loss[row, :len(mask)], attention[row, :len(token_ids)] = token_ids, mask, 1
        yield ids, loss, attention


# ----------------------------------------------------------------- scorers
class JaxScorer:
    def __init__(self, entry: ModelEntry, settings: EvalSettings):
        import jax
        from flax import nnx

        from biomamba_jax.checkpoints.load import model_from_params
        from biomamba_jax.checkpoints.runs import load_model

        config, params, self.description = load_model(entry.path, dtype=settings.dtype, remat="none")
        self.model = model_from_params(config, params)
        self.graphdef, self.state = nnx.split(self.model)
        self.settings, self.tokenizer = settings, entry.tokenizer

        def nll(state, ids, loss_mask, attention):
            import jax.numpy as jnp

            logits = nnx.merge(self.graphdef, state)(ids[:, :-1], attention[:, :-1])
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
            return -jnp.sum(picked * loss_mask[:, 1:]), jnp.sum(loss_mask[:, 1:])

        self._nll = jax.jit(nll)

    def nll(self, ids, loss_mask, attention) -> tuple[float, float]:
        total, count = self._nll(self.state, ids, loss_mask, attention)
        return float(total), float(count)

    def answers(self, questions) -> list[list[str]]:
        from biomamba_jax.model.beam import beam_search, newline_token_mask
        from biomamba_jax.data.bioasq import encode_example
        from biomamba_jax.model.generate import left_pad

        s = self.settings
        stops = newline_token_mask(self.tokenizer, self.model.config.vocab_size)
        prompts = [encode_example(q, self.tokenizer, s.max_tokens - s.max_answer_tokens, with_answer=False)["input_ids"]
                   for q in questions]
        width = max(len(p) for p in prompts)
        results = []
        for start in range(0, len(prompts), s.batch_size):
            chunk = list(prompts[start:start + s.batch_size])
            real = len(chunk)
            chunk += [chunk[0]] * (s.batch_size - real)  # fixed batch shape: one compile per set
            ids, mask = left_pad(chunk)
            ids = np.pad(ids, ((0, 0), (width - ids.shape[1], 0)))
            mask = np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))
            out = beam_search(self.model, ids, mask, num_beams=s.num_beams, max_new_tokens=s.max_answer_tokens,
                              stop_mask=stops)
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            for row in range(real):
                texts = [self.tokenizer.decode(tokens[row, beam, :lengths[row, beam]].tolist(), skip_special_tokens=True)
                         for beam in range(s.num_beams)]
                results.append(_candidates(texts))
        return results


class TorchScorer:
    def __init__(self, entry: ModelEntry, settings: EvalSettings):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(entry.path), dtype=torch.float32).eval()
        self.description = f"transformers {type(self.model).__name__} {entry.path}"
        self.settings, self.tokenizer = settings, entry.tokenizer

    def nll(self, ids, loss_mask, attention) -> tuple[float, float]:
        torch = self.torch
        with torch.no_grad():
            logits = self.model(input_ids=torch.from_numpy(ids[:, :-1]).long(),
                                attention_mask=torch.from_numpy(attention[:, :-1]).long()).logits.float()
            picked = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(ids[:, 1:]).long()[..., None])[..., 0]
            weights = torch.from_numpy(loss_mask[:, 1:])
            return float(-(picked * weights).sum()), float(weights.sum())

    def answers(self, questions) -> list[list[str]]:
        from biomamba_jax.data.bioasq import encode_example

        s, torch, results = self.settings, self.torch, []
        eos = _eos_id(self.tokenizer)
        for question in questions:
            prompt = encode_example(question, self.tokenizer, s.max_tokens - s.max_answer_tokens, with_answer=False)
            ids = torch.from_numpy(prompt["input_ids"]).long()[None]
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=s.num_beams,
                                          num_return_sequences=s.num_beams, max_new_tokens=s.max_answer_tokens,
                                          do_sample=False, eos_token_id=eos, pad_token_id=eos)
            texts = [self.tokenizer.decode(seq[ids.shape[1]:].tolist(), skip_special_tokens=True) for seq in out]
            results.append(_candidates(texts))
        return results


def _candidates(texts: Sequence[str]) -> list[str]:
    """Generated texts -> up to 5 distinct answers: each cut at its first newline, stripped.

    Distinct as the metric sees them: answers equal after `metrics.normalise_answer`
    (lowercasing) would score as one, so only the first (highest-ranked) is kept.
    """
    distinct: dict[str, str] = {}
    for text in texts:
        answer = text.split("\n", 1)[0].strip()
        if answer:
            distinct.setdefault(metrics.normalise_answer(answer), answer)
    return list(distinct.values())[:metrics.MAX_CANDIDATES]


def score(scorer, entry: ModelEntry, eval_set: EvalSet, settings: EvalSettings) -> dict:
    rows, n_bytes = scored_rows(eval_set, entry.tokenizer, settings.max_tokens)
    length = settings.max_tokens + 1 if eval_set.kind == "text" else settings.max_tokens
    nats, tokens = 0.0, 0.0
    for ids, loss_mask, attention in _batches(rows, settings.batch_size, length):
        batch_nats, batch_tokens = scorer.nll(ids, loss_mask, attention)
        nats, tokens = nats + batch_nats, tokens + batch_tokens
    result = {"model": entry.name, "backend": entry.backend, "set": eval_set.name, "kind": eval_set.kind,
              "nats": nats, **metrics.lm_scores(nats, int(round(tokens)), n_bytes)}
    if eval_set.kind == "bioasq" and settings.factoid:
        candidates = scorer.answers(eval_set.items)
        result.update(metrics.factoid_scores(candidates, [q.answers for q in eval_set.items]))
        result["examples"] = [{"id": q.id, "gold": list(q.answers), "candidates": c}
                              for q, c in list(zip(eval_set.items, candidates))[:20]]
    return result


