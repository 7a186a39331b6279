"""run.compile_cache: a repeated or resumed run loads its compiled step from JAX's
persistent cache. JAX's cache is one per process (the test session has its own, see
conftest), so each case runs in a fresh interpreter."""
import json
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from biomamba_jax.training.loop import use_compile_cache
    logged = []
    directory = use_compile_cache(sys.argv[1], logged.append)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
    print(json.dumps({"directory": directory and str(directory), "logged": logged}))
""")


def run_probe(setting, tmp_path, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu", **env_changes)
    done = subprocess.run([sys.executable, "-c", PROBE, setting], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def cached_entries(directory):
    return [p for p in directory.rglob("*") if p.is_file()]


def test_auto_caches_compiled_programs_under_the_user_cache_dir(tmp_path):
    result = run_probe("auto", tmp_path)
    expected = tmp_path / "xdg" / "biomamba-jax" / "xla"
    assert result["directory"] == str(expected)
    assert cached_entries(expected), "the jitted program was not written to the cache"


def test_a_named_dir_is_used_and_off_leaves_the_cache_unset(tmp_path):
    named = tmp_path / "mine"
    assert run_probe(str(named), tmp_path)["directory"] == str(named)
    assert cached_entries(named)
    assert run_probe("off", tmp_path)["directory"] is None
    assert not (tmp_path / "xdg").exists()


def test_a_cache_the_process_already_has_wins(tmp_path):
    chosen = tmp_path / "from-env"
    result = run_probe("auto", tmp_path, JAX_COMPILATION_CACHE_DIR=str(chosen))
    assert result["directory"] == str(chosen)
    assert not (tmp_path / "xdg").exists()


def test_a_cache_dir_that_cannot_be_made_warns_and_the_run_goes_on(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    result = run_probe(str(a_file / "xla"), tmp_path)
    assert result["directory"] is None
    assert "run.compile_cache" in result["logged"][0]
