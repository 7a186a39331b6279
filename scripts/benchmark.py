"""Time the selective-scan impls and the model: scan micro-benchmark, training step
(forward + backward + AdamW), prefill and greedy decode; optional PyTorch comparison.

    PYTHONPATH=. python3 scripts/benchmark.py --preset mamba-130m --impls chunked,pallas \
        --workloads check,scan,train,prefill,decode --out benchmarks/run.json

Each timing is the median of `--repeats` runs after `--warmup` runs, each ended by
`block_until_ready`. Peak memory: the process-wide peak from `memory_stats()` after the
workload (monotone over the run) and the compiled executable's own footprint from
`memory_analysis()` (arguments + outputs + temporaries), which is per workload.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

GiB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]
    p.add_argument("--preset", default="mamba-130m")
    p.add_argument("--layers", type=int, default=None, help="override n_layer (smoke tests)")
    p.add_argument("--dtype", default="bfloat16")
    # Defaults as in the biomamba-130m pretraining preset (fastest measured on H100).
    p.add_argument("--remat", default="scan", choices=["none", "full", "dots", "scan"])
    p.add_argument("--scan-layers", default="false", choices=["true", "false"],
                   help="false: the model's layers written out one by one instead of a lax.scan")
    p.add_argument("--impls", default="associative,chunked,pallas",
                   help="impls for the scan workload; options as in 'pallas:block_e=64:chunk=16'")
    p.add_argument("--train-impls", default=None, help="impls for train/prefill (default: --impls)")
    p.add_argument("--decode-impl", default=None, help="impl for decode (default: last train impl)")
    p.add_argument("--scan-repeats", type=int, default=10)
    p.add_argument("--scan-modes", default="fwd,fwd+bwd,layer-fwd,layer-fwd+bwd",
                   help="fwd/fwd+bwd: the normalised fp32 scan alone; layer-*: selective_scan as "
                        "the model calls it (bf16 u, delta, z; bias, softplus, D and gate)")
    p.add_argument("--check-impls", default="chunked,pallas", help="impls checked against reference")
    p.add_argument("--workloads", default="check,scan,train,prefill,decode")
    p.add_argument("--batch", type=ints, default=[8], help="training batch sizes")
    p.add_argument("--length", type=ints, default=[2048], help="training lengths")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="length sweep: batch = this // length for each --length (ignores --batch)")
    p.add_argument("--scan-shape", type=ints, default=[8, 2048, 1536, 16], help="B,L,E,N")
    p.add_argument("--prefill-length", type=ints, default=[8192])
    p.add_argument("--decode-batch", type=ints, default=[1, 32])
    p.add_argument("--decode-unroll", type=ints, default=[1], help="1: layer loop unrolled per token, 0: lax.scan")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--torch", action="store_true", help="also time transformers MambaForCausalLM")
    p.add_argument("--torch-batch", type=int, default=1)
    p.add_argument("--torch-length", type=int, default=256)
    p.add_argument("--torch-steps", type=int, default=2)
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="import this Python file first, e.g. one that registers another scan impl "
                        "(benchmarks/time_parallel_forward.py registers 'pallas_tp'); repeatable")
    p.add_argument("--out", default=None, help="JSON results path")
    p.add_argument("--dump-hlo", default=None, metavar="DIR", help="write each training step's optimised HLO here")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="after timing train/prefill/decode, trace 3 more calls with the JAX profiler and "
                        "record the TOP ops by device time (0: off)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ timing helpers
def compile_once(jitted, *args):
    """(compiled executable, its footprint in GiB or None, compile seconds)."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - t
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        gib = round(total / GiB, 2)
    except Exception:  # not every backend reports it
        gib = None
    return compiled, gib, round(seconds, 1)


def timed(fn, *args, warmup, repeats):
    """(median seconds, all seconds, compile+first-run seconds) of fn(*args)."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, first


def process_peak_gib():
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats.get("peak_bytes_in_use", 0) / GiB, 2)


def add_profile(row, args, fn, *fn_args):
    """With --profile, the per-op device time of fn(*fn_args) goes into the row and is printed."""
    if not args.profile:
        return
    from biomamba_jax.training.profiling import profile_ops

    try:
        summary = profile_ops(fn, *fn_args, calls=3, top=args.profile)
    except Exception as e:  # a profile is a bonus: never lose the timing over it
        row["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return
    row["profile"] = summary
    label = " ".join(str(row.get(k, "")) for k in ("workload", "impl", "batch", "length"))
    print(f"PROFILE {label}: {summary['device_ms_per_call']} ms of device time per call; by category "
          + ", ".join(f"{k} {v}" for k, v in summary["categories"].items()))
    for op in summary["ops"]:
        print(f"PROFILE   {op['ms_per_call']:9.3f} ms {op['launches_per_call']:7.1f}x {op['category']:12s} {op['name'][:110]}")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------ impl strings
def normalised_scan(spec: str):
    """The normalised-signature scan an impl string names, options applied."""
    from biomamba_jax.model.scan import SCAN_IMPLS, parse_scan_impl

    name, options = parse_scan_impl(spec)
    return functools.partial(SCAN_IMPLS[name], **options)


# ------------------------------------------------------------------ scan workloads
def scan_inputs(seed, batch, length, channels, d_state):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    return (
        jax.random.normal(k[0], (batch, length, channels)),
        jax.nn.softplus(jax.random.normal(k[1], (batch, length, channels)) - 1.0),
        -jnp.exp(jax.random.normal(k[2], (channels, d_state)) * 0.5),
        jax.random.normal(k[3], (batch, length, d_state)),
        jax.random.normal(k[4], (batch, length, d_state)),
        jax.random.normal(k[5], (batch, channels, d_state)),
    )


def scan_loss(fn, weights):
    def loss(u, delta, A, B, C, h0):
        y, final = fn(u, delta, A, B, C, h0)
        return jnp.sum(y * weights) + jnp.sum(final * final)
    return loss


def layer_inputs(seed, batch, length, channels, d_state, dtype):
    """selective_scan's arguments as the model passes them: raw delta, D, z, dt bias."""
    k = jax.random.split(jax.random.PRNGKey(seed), 9)
    return dict(
        u=jax.random.normal(k[0], (batch, length, channels), dtype),
        delta=(jax.random.normal(k[1], (batch, length, channels)) - 1.0).astype(dtype),
        A=-jnp.exp(jax.random.normal(k[2], (channels, d_state)) * 0.5),
        B=jax.random.normal(k[3], (batch, length, d_state), dtype),
        C=jax.random.normal(k[4], (batch, length, d_state), dtype),
        D=jax.random.normal(k[5], (channels,)),
        z=jax.random.normal(k[6], (batch, length, channels), dtype),
        delta_bias=jax.random.normal(k[7], (channels,)) * 0.3,
        initial_state=jax.random.normal(k[8], (batch, channels, d_state)),
    )


def layer_loss(impl, weights):
    from biomamba_jax.model.scan import selective_scan

    def loss(x):
        y, final = selective_scan(**x, delta_softplus=True, return_final_state=True, impl=impl)
        return jnp.sum(y.astype(jnp.float32) * weights) + jnp.sum(final * final)
    return loss


def check_impls(impls, results):
    """Values and gradients of each impl against `reference` on fresh random inputs: the
    normalised scan, and selective_scan with bias, softplus, D and gate (the fused path)."""
    ok = True
    reference = normalised_scan("reference")
    # The last shape is split into 2 segments of 1024 steps (after padding 2045 to 2048),
    # so the segment sums run in 32-step tiles.
    for seed, shape in enumerate([(2, 300, 96, 16), (1, 77, 40, 16), (3, 33, 7, 5), (1, 2045, 64, 16)]):
        x = scan_inputs(100 + seed, *shape)
        w = jax.random.normal(jax.random.PRNGKey(seed), shape[:3])
        ref = jax.jit(reference)(*x)
        ref_g = jax.jit(jax.grad(scan_loss(reference, w), argnums=tuple(range(6))))(*x)
        layer = layer_inputs(200 + seed, *shape, jnp.float32)
        ref_layer = jax.jit(jax.value_and_grad(layer_loss("reference", w)))(layer)
        for impl in impls:
            try:
                fn = normalised_scan(impl)
                out = jax.jit(fn)(*x)
                g = jax.jit(jax.grad(scan_loss(fn, w), argnums=tuple(range(6))))(*x)
                errs = [rel_err(out[0], ref[0]), rel_err(out[1], ref[1])] + [rel_err(a, b) for a, b in zip(g, ref_g)]
                value, grads = jax.jit(jax.value_and_grad(layer_loss(impl, w)))(layer)
                errs += [rel_err(value, ref_layer[0])] + [rel_err(grads[k], ref_layer[1][k]) for k in sorted(grads)]
                passed = all(np.isfinite(errs)) and max(errs) < 1e-4
            except Exception as e:  # report and carry on with the other impls
                errs, passed = [f"{type(e).__name__}: {str(e)[:300]}"], False
            ok &= passed
            results.append(dict(workload="check", impl=impl, shape=shape, max_rel_err=max(errs) if passed else None,
                                errs=errs, passed=passed))
            print(f"check {impl:24s} {shape} {'PASSED' if passed else 'FAILED'} {errs}", flush=True)
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED", flush=True)
    return ok


def bench_scan(impls, shape, args, results):
    """One layer's scan at (B, L, E, N): forward alone, and forward + backward, either the
    normalised fp32 scan or selective_scan as the model calls it (`--scan-modes`)."""
    x = scan_inputs(0, *shape)
    w = jax.random.normal(jax.random.PRNGKey(1), shape[:3])
    layer = layer_inputs(0, *shape, jnp.dtype(args.dtype))
    for impl in impls:
        for mode in args.scan_modes.split(","):
            if mode.startswith("layer"):
                loss = layer_loss(impl, w)
                f = jax.jit(loss if mode == "layer-fwd" else jax.grad(loss))
                inputs = (layer,)
            else:
                fn = normalised_scan(impl)
                f = jax.jit(fn) if mode == "fwd" else jax.jit(jax.grad(scan_loss(fn, w), argnums=(0, 1, 2, 3, 4)))
                inputs = x
            row = dict(workload="scan", impl=impl, mode=mode, shape=shape)
            try:
                compiled, gib, compile_s = compile_once(f, *inputs)
                med, times, _ = timed(compiled, *inputs, warmup=args.warmup, repeats=args.scan_repeats)
                row.update(ms=round(med * 1e3, 3), times_ms=[round(t * 1e3, 3) for t in times],
                           compile_s=compile_s, exe_GiB=gib, peak_GiB=process_peak_gib())
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
            results.append(row)
            print(json.dumps(row), flush=True)


# ------------------------------------------------------------------ model workloads
def build_model(args, impl):
    from flax import nnx

    from biomamba_jax.model.config import MambaConfig
    from biomamba_jax.model.mamba import MambaLM

    overrides = dict(dtype=args.dtype, scan_impl=impl, remat=args.remat, scan_layers=args.scan_layers == "true")
    if args.layers:
        overrides["n_layer"] = args.layers
    cfg = MambaConfig.preset(args.preset, **overrides)
    return cfg, MambaLM(cfg, rngs=nnx.Rngs(0))


def bench_train(impl, batch, length, args, results):
    import optax
    from flax import nnx

    cfg, model = build_model(args, impl)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    tx = optax.adamw(6e-4, weight_decay=0.1)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, ids):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(ids[:, :-1]).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ids = jax.random.randint(jax.random.PRNGKey(0), (batch, length + 1), 0, cfg.vocab_size - 8)
    row = dict(workload="train", impl=impl, batch=batch, length=length, layers=cfg.n_layer,
               params_M=round(n_params / 1e6, 1), remat=args.remat, scan_layers=cfg.scan_layers,
               dtype=args.dtype)
    try:
        compiled, exe, compile_s = compile_once(train_step, params, opt_state, ids)
        if args.dump_hlo:  # the optimised program, to map profile op names to what they compute
            os.makedirs(args.dump_hlo, exist_ok=True)
            name = f"train-{impl.replace(':', '_')}-b{batch}-l{length}-remat_{args.remat}-scan_layers_{args.scan_layers}.hlo.txt"
            with open(os.path.join(args.dump_hlo, name), "w") as f:
                f.write(compiled.as_text())
        state = [params, opt_state]

        def run():
            state[0], state[1], loss = compiled(state[0], state[1], ids)
            return loss

        med, times, _ = timed(run, warmup=args.warmup, repeats=args.repeats)
        row.update(step_s=round(med, 4), tokens_per_s=round(batch * length / med), times_s=[round(t, 4) for t in times],
                   compile_s=compile_s, exe_GiB=exe, peak_GiB=process_peak_gib(), loss=float(run()))
        add_profile(row, args, run)
    except Exception as e:
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()
    results.append(row)
    print(json.dumps(row), flush=True)
    return row


def bench_prefill(impl, length, args, results):
    from flax import nnx

    cfg, model = build_model(args, impl)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, ids):
        logits, cache = nnx.merge(graphdef, state).prefill(ids)
        return logits[:, -1], cache

    ids = jax.random.randint(jax.random.PRNGKey(2), (1, length), 0, cfg.vocab_size - 8)
    row = dict(workload="prefill", impl=impl, batch=1, length=length)
    try:
        compiled, gib, compile_s = compile_once(prefill, state, ids)
        med, times, _ = timed(compiled, state, ids, warmup=args.warmup, repeats=args.repeats)
        row.update(s=round(med, 5), tokens_per_s=round(length / med), compile_s=compile_s,
                   exe_GiB=gib, peak_GiB=process_peak_gib())
        add_profile(row, args, compiled, state, ids)
    except Exception as e:
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
    results.append(row)
    print(json.dumps(row), flush=True)


def bench_decode(impl, batch, unroll, args, results):
    from biomamba_jax.model.generate import generate

    cfg, model = build_model(args, impl)
    ids = jax.random.randint(jax.random.PRNGKey(3), (batch, args.prompt), 0, cfg.vocab_size - 8)
    run = lambda: generate(model, ids, max_new_tokens=args.new_tokens, eos_token_id=None,
                           unroll_layers=bool(unroll)).tokens
    row = dict(workload="decode", impl=impl, batch=batch, prompt=args.prompt, new_tokens=args.new_tokens,
               unroll_layers=bool(unroll))
    try:
        med, times, first = timed(run, warmup=args.warmup, repeats=args.repeats)
        # Like mamba_ssm's benchmark: whole generate call (prefill included) over new tokens.
        row.update(s=round(med, 4), ms_per_token=round(med / args.new_tokens * 1e3, 3),
                   tokens_per_s=round(batch * args.new_tokens / med), compile_s=round(first, 1),
                   peak_GiB=process_peak_gib())
        add_profile(row, args, run)
    except Exception as e:
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
    results.append(row)
    print(json.dumps(row), flush=True)


def bench_torch(args, results):
    """transformers MambaForCausalLM (no CUDA kernels here), same training step, bf16 autocast."""
    try:
        import torch
        from transformers import MambaConfig as HFConfig, MambaForCausalLM
    except ImportError as e:
        print(f"torch comparison skipped: {e}")
        return None
    if not torch.cuda.is_available():
        print("torch comparison skipped: no CUDA")
        return None
    from biomamba_jax.model.config import MambaConfig

    c = MambaConfig.preset(args.preset, **({"n_layer": args.layers} if args.layers else {}))
    hf = HFConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, state_size=c.d_state,
                  num_hidden_layers=c.n_layer, expand=c.expand, conv_kernel=c.d_conv,
                  time_step_rank=c.dt_rank, use_cache=False)
    model = MambaForCausalLM(hf).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=True)
    ids = torch.randint(0, c.vocab_size - 8, (args.torch_batch, args.torch_length + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.torch_steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    row = dict(workload="train-torch", impl="transformers-MambaForCausalLM", batch=args.torch_batch,
               length=args.torch_length, step_s=round(med, 4),
               tokens_per_s=round(args.torch_batch * args.torch_length / med),
               peak_GiB=round(torch.cuda.max_memory_allocated() / GiB, 2), torch=torch.__version__)
    results.append(row)
    print(json.dumps(row), flush=True)
    del model, opt
    torch.cuda.empty_cache()
    return row


def print_table(results):
    print(f"\n{'workload':18s} {'impl':30s} {'shape':22s} {'time':>12s} {'tokens/s':>11s} {'exe GiB':>8s} {'peak GiB':>8s}")
    for r in results:
        if r["workload"] == "check":
            continue
        shape = r.get("shape") or [r.get(k) for k in ("batch", "length", "prompt", "new_tokens") if r.get(k) is not None]
        if "error" in r:
            print(f"{r['workload']:12s} {r['impl']:30s} {str(shape):22s} ERROR {r['error'][:80]}")
            continue
        if "ms" in r:
            t = f"{r['ms']:.3f} ms"
        elif "ms_per_token" in r:
            t = f"{r['ms_per_token']:.3f} ms/tok"
        else:
            t = f"{r.get('step_s', r.get('s')):.4f} s"
        mode = r.get("mode", "")
        print(f"{(r['workload'] + ' ' + mode):18s} {r['impl']:30s} {str(shape):22s} {t:>12s} "
              f"{str(r.get('tokens_per_s', '')):>11s} {str(r.get('exe_GiB', '')):>8s} {str(r.get('peak_GiB', '')):>8s}")


def main(argv=None):
    args = parse_args(argv)
    import biomamba_jax.model.scan  # noqa: F401  (registers every impl)

    for path in args.plugin:
        if not os.path.isfile(path):
            raise SystemExit(f"--plugin {path}: no such file")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))

    impls = [s for s in args.impls.split(",") if s]
    train_impls = [s for s in (args.train_impls or args.impls).split(",") if s]
    decode_impl = args.decode_impl or train_impls[0]
    workloads = set(args.workloads.split(","))

    class Results(list):
        """Rewrites the JSON file after every row, so a run cut short keeps what it measured."""
        def append(self, row):
            super().append(row)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(dict(meta=meta, results=self), f, indent=1)

    results = Results()
    meta = dict(command=" ".join([sys.executable] + sys.argv), date=datetime.datetime.now().isoformat(timespec="seconds"),
                device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__)
    print(json.dumps(meta), flush=True)
    if "check" in workloads:
        meta["checks_passed"] = check_impls([s for s in args.check_impls.split(",") if s], results)
    if "scan" in workloads:
        bench_scan(impls, tuple(args.scan_shape), args, results)
    if "train" in workloads:
        for impl in train_impls:
            for length in args.length:
                for b in ([args.tokens_per_step // length] if args.tokens_per_step else args.batch):
                    bench_train(impl, b, length, args, results)
    if "prefill" in workloads:
        for impl in train_impls:
            for length in args.prefill_length:
                bench_prefill(impl, length, args, results)
    if "decode" in workloads:
        for unroll in args.decode_unroll:
            for b in args.decode_batch:
                bench_decode(decode_impl, b, unroll, args, results)
    if args.torch:
        torch_row = bench_torch(args, results)
        if torch_row:
            jax_row = bench_train(train_impls[0], args.torch_batch, args.torch_length, args, results)
            if "tokens_per_s" in jax_row:
                meta["jax_over_torch"] = round(jax_row["tokens_per_s"] / torch_row["tokens_per_s"], 2)
                print(f"JAX {train_impls[0]} / transformers at B={args.torch_batch} L={args.torch_length}: "
                      f"{meta['jax_over_torch']}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    print_table(results)


if __name__ == "__main__":
    main()
