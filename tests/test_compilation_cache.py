"""The persistent compilation cache ``main.py`` sets up (``config.compilation_cache``)."""

import glob
import logging
import os
import subprocess
import sys

import jax
import pytest

from alexnet_jax import compilation_cache
from alexnet_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def jax_cache_settings():
    """Puts JAX's cache settings back after the test (this process compiles on with them)."""
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_compilation_cache_max_size", saved[1])


def test_auto_keeps_a_cache_jax_was_given(jax_cache_settings, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "given"))
    jax.config.update("jax_compilation_cache_max_size", -1)
    assert compilation_cache.configure("auto") == str(tmp_path / "given")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "given")
    assert jax.config.jax_compilation_cache_max_size == -1  # the caller's, untouched


def test_auto_without_one_uses_the_users_cache_folder_bounded(
    jax_cache_settings, tmp_path, monkeypatch
):
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_compilation_cache_max_size", -1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = str(tmp_path / "xdg" / "alexnet_jax" / "xla")
    assert compilation_cache.configure("auto") == expected
    assert os.path.isdir(expected)
    assert jax.config.jax_compilation_cache_dir == expected
    assert jax.config.jax_compilation_cache_max_size == compilation_cache.MAX_BYTES
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation_cache.default_dir() == str(tmp_path / "home/.cache/alexnet_jax/xla")


def test_auto_with_an_unusable_cache_folder_runs_uncached_with_a_warning(
    jax_cache_settings, tmp_path, monkeypatch, caplog
):
    jax.config.update("jax_compilation_cache_dir", None)
    (tmp_path / "xdg").write_text("a file where the folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with caplog.at_level(logging.WARNING):
        assert compilation_cache.configure("auto") is None
    assert jax.config.jax_compilation_cache_dir is None
    assert "No compilation cache: cannot create" in caplog.text
    assert str(tmp_path / "xdg") in caplog.text


def test_a_named_folder_is_used_and_none_turns_the_cache_off(
    jax_cache_settings, tmp_path, monkeypatch
):
    jax.config.update("jax_compilation_cache_max_size", -1)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compilation_cache.configure("~/xla cache") == str(tmp_path / "xla cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla cache")
    assert jax.config.jax_compilation_cache_max_size == -1  # a folder of the user's: unbounded
    assert os.path.isdir(tmp_path / "xla cache")
    assert compilation_cache.configure("none") is None
    assert jax.config.jax_compilation_cache_dir is None


def test_a_folder_that_cannot_hold_the_cache_is_a_config_error(jax_cache_settings, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"config.compilation_cache='.*file/xla': cannot create"):
        compilation_cache.configure(str(tmp_path / "file" / "xla"))
    with pytest.raises(ConfigError, match="config.compilation_cache='': 'auto', 'none' or a"):
        compilation_cache.configure("")


@pytest.mark.slow
def test_a_second_run_loads_the_train_step_from_the_users_cache(tmp_path):
    """main.py with the default ``auto`` and no cache in the environment: the first run
    writes its compiled initializer and train step under $XDG_CACHE_HOME; the resumed run
    finds its train step there (JAX's debug log says so) and keeps every entry."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), XLA_FLAGS="",
               JAX_DEBUG_LOG_MODULES="jax._src.compiler")  # fmt: skip
    cache = tmp_path / "xdg" / "alexnet_jax" / "xla"
    command = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={tmp_path / 'run'}",
               "--config.batch_size=8", "--config.eval_batch_size=40",
               "--config.eval_every_epochs=100", "--config.checkpoint_every_steps=1",
               "--config.progress_bar=False"]  # fmt: skip
    outputs, entries = [], []
    for steps in (1, 2):
        result = subprocess.run(
            [*command, f"--config.num_train_steps={steps}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stderr)
        entries.append(sorted(glob.glob(str(cache / "*-cache"))))
    assert f"compilation cache {cache}" in outputs[0]
    assert "Resuming from the checkpoint at step 1" in outputs[1]
    assert len(entries[0]) >= 2, entries  # the initializer and the train step, at least
    assert set(entries[0]) <= set(entries[1])
    assert "persistent compilation cache hit" not in outputs[0].lower()
    assert "persistent compilation cache hit" in outputs[1].lower()
