"""Where the drift kernels come from: the cache of the ahead-of-time build, its key, its
lock, and the fall-back to Numba's JIT when the build cannot run. (What the kernels
compute, on both backends, is tests/test_kernels.py's.)"""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tidegate import kernel_backend
from tidegate.kernel_backend import KernelBuildError

# distutils compiles with $CC: a compiler that always fails is a machine without one.
NO_COMPILER = {"CC": "/bin/false", "CXX": "/bin/false"}


@pytest.fixture
def no_backend_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that has not chosen its kernels yet (restored after the test)."""
    monkeypatch.setattr(kernel_backend, "_active", None)


def test_the_cache_is_the_env_var_then_numba_s_cache_then_the_user_s(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.delenv("TIDEGATE_KERNEL_CACHE", raising=False)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_backend.cache_root() == tmp_path / "xdg" / "tidegate" / "kernels"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert kernel_backend.cache_root() == tmp_path / "numba" / "tidegate-aot"
    monkeypatch.setenv("TIDEGATE_KERNEL_CACHE", str(tmp_path / "mine"))
    assert kernel_backend.cache_root() == tmp_path / "mine"


def test_the_key_names_everything_that_changes_the_binary():
    parts = kernel_backend.key_parts()
    assert set(parts) == {
        "tidegate",
        "source",
        "numba",
        "llvmlite",
        "numpy",
        "python",
        "abi",
        "platform",
        "cpu",
    }
    key = kernel_backend.cache_key(parts)
    assert key == kernel_backend.cache_key()  # stable
    assert key.startswith(f"tidegate-{parts['tidegate']}-numba-{parts['numba']}-")
    for name in parts:
        assert kernel_backend.cache_key({**parts, name: "other"}) != key, name


def _fake_build(calls: list[str]):
    """Stands in for the compiler: a complete build after a pause, counted."""

    def build_into(final: Path, parts: dict[str, str]) -> None:
        calls.append(final.name)
        time.sleep(0.2)
        final.mkdir(exist_ok=True)
        (final / kernel_backend.MANIFEST).write_text(json.dumps({"extension": "x.so"}))

    return build_into


def test_a_complete_build_is_reused_and_concurrent_builds_build_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    calls: list[str] = []
    monkeypatch.setattr(kernel_backend, "_build_into", _fake_build(calls))
    built: list[Path] = []
    threads = [
        threading.Thread(target=lambda: built.append(kernel_backend.build(tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [kernel_backend.cache_key()]  # one build; the others waited on the lock
    assert built == [tmp_path / kernel_backend.cache_key()] * 3
    kernel_backend.build(tmp_path)
    assert len(calls) == 1  # in the cache now
    kernel_backend.build(tmp_path, force=True)
    assert len(calls) == 2


def test_a_cache_it_cannot_write_is_a_build_error(tmp_path: Path):
    cache = tmp_path / "cache"
    cache.write_text("a file where the directory should be")
    with pytest.raises(KernelBuildError, match="kernel cache"):
        kernel_backend.build(cache)


def test_what_a_killed_build_left_is_cleared_and_built_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    key = kernel_backend.cache_key()
    (tmp_path / key).mkdir()  # no manifest: not a build
    (tmp_path / f"{key}.abc123.tmp").mkdir()  # a killed build's scratch directory
    calls: list[str] = []

    def build_into(final: Path, parts: dict[str, str]) -> None:
        calls.append(final.name)
        assert final.exists()  # the real one replaces it (tested below, end to end)

    monkeypatch.setattr(kernel_backend, "_build_into", build_into)
    kernel_backend.build(tmp_path)
    assert len(calls) == 1
    assert not (tmp_path / f"{key}.abc123.tmp").exists()


def test_a_build_without_a_compiler_fails_fast_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    for name, value in NO_COMPILER.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(KernelBuildError, match=r"no working C/C\+\+ compiler") as failed:
        kernel_backend.build(tmp_path)
    assert time.monotonic() - started < 60  # before LLVM's work, not after it
    assert "compiler" in failed.value.output
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # nothing half-built


@pytest.mark.usefixtures("no_backend_chosen")
def test_auto_falls_back_to_the_jit_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv("TIDEGATE_KERNEL_CACHE", str(tmp_path))
    for name, value in NO_COMPILER.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TIDEGATE_KERNELS", raising=False)
    with caplog.at_level(logging.INFO, logger="tidegate.kernels"):
        chosen = kernel_backend.kernels()
        assert kernel_backend.kernels() is chosen  # chosen once per process
    assert chosen.backend == "jit"
    assert kernel_backend.active() is chosen
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "no working C/C++ compiler" in warning.getMessage()
    assert f"about {kernel_backend.JIT_EXTRA_MIB} MiB more memory" in warning.getMessage()


@pytest.mark.usefixtures("no_backend_chosen")
def test_aot_is_strict_and_jit_is_forced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("TIDEGATE_KERNEL_CACHE", str(tmp_path))
    for name, value in NO_COMPILER.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TIDEGATE_KERNELS", "aot")
    with pytest.raises(KernelBuildError, match="compiler"):
        kernel_backend.kernels()
    assert kernel_backend.active() is None
    monkeypatch.setenv("TIDEGATE_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="auto, aot or jit"):
        kernel_backend.kernels()
    monkeypatch.setenv("TIDEGATE_KERNELS", "jit")
    monkeypatch.setenv("TIDEGATE_KERNEL_CACHE", str(tmp_path / "unused"))
    assert kernel_backend.kernels().backend == "jit"
    assert not (tmp_path / "unused").exists()  # no build tried


def test_the_command_builds_a_complete_directory_that_loads_without_numba(tmp_path: Path):
    def run(*command: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *command],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "TIDEGATE_KERNEL_CACHE": str(tmp_path), **env},
        )

    failed = run("-m", "tidegate", "kernels", "build", **NO_COMPILER)
    assert failed.returncode == 1
    assert "no working C/C++ compiler" in failed.stderr
    assert "servers will run Numba's JIT instead" in failed.stderr

    built = run("-m", "tidegate", "kernels", "build")
    assert built.returncode == 0, built.stderr
    extension = Path(built.stdout.strip())
    directory = tmp_path / kernel_backend.cache_key()
    assert extension.parent == directory
    manifest = json.loads((directory / kernel_backend.MANIFEST).read_text())
    assert manifest["key"] == kernel_backend.key_parts()
    assert sorted(p.name for p in directory.iterdir()) == [extension.name, "build.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    code = (
        "import sys; from tidegate import kernel_backend as k; s = k.kernels(); s.warm_up(); "
        "print(s.backend, s.origin, sorted({'numba', 'llvmlite'} & set(sys.modules)))"
    )
    loaded = run("-c", code, TIDEGATE_KERNELS="auto")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["aot", str(extension), "[]"]
