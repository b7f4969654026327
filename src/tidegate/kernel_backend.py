"""Which drift kernels this process runs, and where their machine code comes from.

Theory of operation
-------------------
The drift kernels are Numba code (kernels.py). Run by Numba's JIT they cost the serving
process about 120 MiB: importing numba (~62 MiB) and initialising LLVM, which loading
even cached machine code does (~61 MiB). So by default the same functions are compiled
ahead of time by `numba.pycc` into a small CPython extension (kernels_build.py), in a
subprocess, which is the only place numba is imported on that path; the server imports
the extension with importlib, and neither numba nor llvmlite enters its memory.

Backends, chosen by $TIDEGATE_KERNELS:
- `auto` (the default): the ahead-of-time (AOT) extension, built at first use when it
  is missing; if it cannot be built or loaded, Numba's JIT in this process, with one
  warning that says why and what it costs.
- `aot`: the extension or an error (for images and tests that must not fall back).
- `jit`: Numba's JIT in this process, as before the extension existed.

The extension lives in CACHE/KEY/. CACHE is $TIDEGATE_KERNEL_CACHE, else
$NUMBA_CACHE_DIR/tidegate-aot, else the user's cache directory (~/.cache/tidegate/kernels).
KEY names everything that changes the binary: tidegate's version, a hash of the kernel
source (kernels.py and kernels_build.py), the numba, llvmlite, numpy and Python versions,
the platform and the CPU (the code is compiled for this machine's CPU, as the JIT
compiles it; a binary must never run on a CPU without its instructions). A build holds
the file lock CACHE/KEY.lock, so processes that start together build once; it writes
into a temporary directory and renames it into place, so a reader sees a complete build
or none. `tidegate kernels build` (run by `make install` and the Dockerfile) builds it
before the first serve, which then pays nothing.

numba.pycc checks only the item size of the arrays it is given, so calling the
extension with another dtype, rank or layout would read or write the wrong memory. The
wrappers here check each call instead, as the JIT's dispatcher does: the inputs (the
batch, scores, class indices, the profile's edges) are made C-contiguous, the state
arrays must already be C-contiguous, writeable and of the exact dtype, and anything
else is a TypeError.
"""

import contextlib
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from tidegate import __version__

log = logging.getLogger("tidegate.kernels")

Backend = Literal["aot", "jit"]
BACKEND_ENV = "TIDEGATE_KERNELS"
CACHE_ENV = "TIDEGATE_KERNEL_CACHE"
EXTENSION = "_tidegate_kernels"  # the extension module's name (its PyInit_ symbol)
# The batch dtypes compiled ahead of time, by the suffix of their exported functions.
BATCH_DTYPES: dict[str, np.dtype[Any]] = {"f32": np.dtype(np.float32), "f64": np.dtype(np.float64)}
MANIFEST = "build.json"  # written last: a directory without it is not a build
BUILD_TIMEOUT_S = 900.0
# What the JIT costs a process beyond the extension (benchmarks/RESULTS.md), for the warning.
JIT_EXTRA_MIB = 120
_SOURCES = ("kernels.py", "kernels_build.py")

_I64 = np.dtype(np.int64)
_F64 = np.dtype(np.float64)
_Array = npt.NDArray[Any]


class KernelBuildError(Exception):
    """The ahead-of-time kernels could not be built or loaded; the message says why and
    `output` holds what the build printed, if it ran."""

    def __init__(self, message: str, *, output: str = "") -> None:
        super().__init__(message)
        self.output = output


@dataclass(frozen=True, slots=True)
class KernelSet:
    """The drift kernels of one backend, with the signatures of kernels.py's."""

    backend: Backend
    origin: str  # the extension's path, or "numba" for the JIT
    update_features: Callable[..., None]
    update_argmax: Callable[..., None]
    update_classes: Callable[..., None]

    def warm_up(self) -> None:
        """Has each kernel run once per argument type a request uses (the JIT compiles
        them, or loads them from Numba's cache, here; the extension just runs)."""
        exercise(self.update_features, self.update_argmax, self.update_classes)


def exercise(
    update_features: Callable[..., None],
    update_argmax: Callable[..., None],
    update_classes: Callable[..., None],
) -> None:
    """Calls each kernel once with every argument type a request passes: float32 and
    float64 batches, writeable and read-only (a tensor decoded from a binary body is a
    read-only `np.frombuffer` view), and the state as drift.py builds it: C-contiguous,
    writeable, int64 counts and float64 sums."""
    for dtype in BATCH_DTYPES.values():
        for writeable in (True, False):
            x = np.zeros((2, 1), dtype)
            p = np.zeros((2, 2), dtype)
            x.flags.writeable = p.flags.writeable = writeable
            edges, lo, hi, shift = np.zeros((1, 1)), np.zeros(1), np.ones(1), np.zeros(1)
            update_features(x, edges, lo, hi, shift, *fresh_state(1, 2))
            update_argmax(p, np.zeros(2, np.int64), np.zeros(1))
    update_classes(np.zeros(2, np.int64), np.zeros(2, np.int64))


def fresh_state(features: int, bins: int) -> list[_Array]:
    """counts, below, above, nonfinite, n, s1, s2, vmin, vmax: an empty feature state."""
    return [
        np.zeros((features, bins), np.int64),
        *(np.zeros(features, np.int64) for _ in range(4)),
        np.zeros(features),
        np.zeros(features),
        np.full(features, np.inf),
        np.full(features, -np.inf),
    ]


# -- where the extension lives -----------------------------------------------------------


def cache_root() -> Path:
    """$TIDEGATE_KERNEL_CACHE, else $NUMBA_CACHE_DIR/tidegate-aot, else the user's cache."""
    if explicit := os.environ.get(CACHE_ENV):
        return Path(explicit)
    if numba_cache := os.environ.get("NUMBA_CACHE_DIR"):
        return Path(numba_cache) / "tidegate-aot"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tidegate" / "kernels"


def key_parts() -> dict[str, str]:
    """Everything that changes the extension's binary, by name."""
    here = Path(__file__).parent
    source = hashlib.sha256()
    for name in _SOURCES:
        source.update((here / name).read_bytes())
    return {
        "tidegate": __version__,
        "source": source.hexdigest()[:16],
        "numba": _distribution_version("numba"),
        "llvmlite": _distribution_version("llvmlite"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "abi": importlib.machinery.EXTENSION_SUFFIXES[0],
        "platform": f"{sys.platform}-{platform.machine()}",
        "cpu": _cpu_fingerprint(),
    }


def cache_key(parts: dict[str, str] | None = None) -> str:
    """The directory name of this machine's build: readable versions, then a hash of all."""
    parts = key_parts() if parts is None else parts
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"tidegate-{parts['tidegate']}-numba-{parts['numba']}-{digest}"


def _distribution_version(name: str) -> str:
    # From the installed metadata: importing numba to read its version is what we avoid.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _cpu_fingerprint() -> str:
    """The CPU's model and instruction-set flags (Linux), else what platform knows."""
    wanted = ("vendor_id", "model name", "flags", "features", "cpu implementer", "cpu part")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            first = cpuinfo.read().split("\n\n", 1)[0]
    except OSError:
        first = ""
    lines = [
        line.strip()
        for line in first.splitlines()
        if line.partition(":")[0].strip().lower() in wanted
    ]
    text = "\n".join(lines) or f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- building ----------------------------------------------------------------------------


def build(root: Path | None = None, *, force: bool = False) -> Path:
    """Builds this machine's extension unless CACHE/KEY holds it; returns that directory.

    Runs `python -m tidegate.kernels_build` in a subprocess under a file lock, so this
    process never imports numba and concurrent processes build once. `force` builds
    again even when a build exists.

    Raises:
        KernelBuildError: the build failed (no C compiler, say); the message says why.
    """
    root = cache_root() if root is None else root
    parts = key_parts()
    final = root / cache_key(parts)
    if not force and _manifest(final) is not None:
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f"{final.name}.lock"):
            if not force and _manifest(final) is not None:
                return final  # another process built it while this one waited
            # Holding the lock, no other process builds this key: its scratch
            # directories are what killed builds left.
            for stale in root.glob(f"{final.name}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            _build_into(final, parts)
    except OSError as exc:  # a cache this user cannot write, a full disk
        raise KernelBuildError(f"kernel cache {root}: {exc}") from exc
    return final


def _build_into(final: Path, parts: dict[str, str]) -> None:
    scratch = Path(tempfile.mkdtemp(prefix=f"{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        started = time.monotonic()
        command = [sys.executable, "-m", "tidegate.kernels_build", str(scratch)]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelBuildError(f"{' '.join(command)}: {exc}") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            reason = output.splitlines()[-1] if output else f"exit code {done.returncode}"
            raise KernelBuildError(
                f"python -m tidegate.kernels_build failed: {reason}", output=output
            )
        built = sorted(p.name for p in scratch.iterdir() if p.name.startswith(f"{EXTENSION}."))
        if len(built) != 1:
            raise KernelBuildError(f"the build left {built or 'no'} extension files")
        manifest = {
            "extension": built[0],
            "key": parts,
            "built_s": round(time.monotonic() - started, 1),
        }
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2))
        scratch.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        if final.exists():
            shutil.rmtree(final)  # force, or a directory a crashed build left
        scratch.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (flock: released if the holder dies)."""
    with path.open("a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: the rename into place still keeps builds whole
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest: dict[str, Any] = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest


# -- loading -----------------------------------------------------------------------------

_loaded: dict[Path, KernelSet] = {}
_load_lock = threading.Lock()


def aot(root: Path | None = None) -> KernelSet:
    """The ahead-of-time kernels, built first if this machine has none in the cache.

    Raises:
        KernelBuildError: they could not be built or loaded.
    """
    directory = build(root)
    manifest = _manifest(directory)
    if manifest is None:
        raise KernelBuildError(f"{directory} holds no complete build")
    path = directory / str(manifest["extension"])
    with _load_lock:
        if path not in _loaded:
            try:
                loaded = _wrap(_import(path), str(path))
                loaded.warm_up()
            except (AttributeError, TypeError, ValueError) as exc:
                raise KernelBuildError(f"{path} does not work: {exc!r}") from exc
            _loaded[path] = loaded
        return _loaded[path]


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(EXTENSION, path)
    if spec is None or spec.loader is None:
        raise KernelBuildError(f"{path} is not an extension module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise KernelBuildError(f"cannot import {path}: {exc}") from exc
    return module


def jit() -> KernelSet:
    """Numba's JIT kernels in this process (imports numba)."""
    from tidegate import kernels

    return KernelSet(
        "jit", "numba", kernels.update_features, kernels.update_argmax, kernels.update_classes
    )


def _wrap(module: ModuleType, origin: str) -> KernelSet:
    """The extension's functions behind the checks that numba's dispatcher would make."""
    features = {dtype: getattr(module, f"update_features_{s}") for s, dtype in BATCH_DTYPES.items()}
    argmax = {dtype: getattr(module, f"update_argmax_{s}") for s, dtype in BATCH_DTYPES.items()}
    classes = module.update_classes

    def update_features(
        x: _Array,
        edges: _Array,
        lo: _Array,
        hi: _Array,
        shift: _Array,
        counts: _Array,
        below: _Array,
        above: _Array,
        nonfinite: _Array,
        n: _Array,
        s1: _Array,
        s2: _Array,
        vmin: _Array,
        vmax: _Array,
    ) -> None:
        x = _batch(x, "x")
        _require(_F64, 2, edges, writeable=False)
        _require(_F64, 1, lo, hi, shift, writeable=False)
        _require(_I64, 2, counts)
        _require(_I64, 1, below, above, nonfinite, n)
        _require(_F64, 1, s1, s2, vmin, vmax)
        features[x.dtype](
            x, edges, lo, hi, shift, counts, below, above, nonfinite, n, s1, s2, vmin, vmax
        )

    def update_argmax(p: _Array, class_counts: _Array, confidence_sum: _Array) -> None:
        p = _batch(p, "p")
        _require(_I64, 1, class_counts)
        _require(_F64, 1, confidence_sum)
        argmax[p.dtype](p, class_counts, confidence_sum)

    def update_classes(indices: _Array, class_counts: _Array) -> None:
        indices = np.ascontiguousarray(indices)
        _require(_I64, 1, indices, writeable=False)
        _require(_I64, 1, class_counts)
        classes(indices, class_counts)

    return KernelSet("aot", origin, update_features, update_argmax, update_classes)


def _batch(x: _Array, name: str) -> _Array:
    """A batch (any layout) as the C-contiguous float32 or float64 matrix compiled for."""
    x = np.ascontiguousarray(x)
    if x.ndim != 2 or x.dtype not in BATCH_DTYPES.values():
        raise TypeError(f"{name} must be a 2-D float32 or float64 array, not {x.ndim}-D {x.dtype}")
    return x


def _require(dtype: np.dtype[Any], ndim: int, *arrays: _Array, writeable: bool = True) -> None:
    """Arrays exactly as compiled for: this dtype and rank, C-contiguous and, for the state
    the kernels write, writeable (numpy's `carray` flag: C-contiguous, aligned, writeable).
    About 150 ns an array; anything without these attributes is refused too, and an
    object that has them but is no array is refused by the extension's own unboxing."""
    for array in arrays:
        try:
            fits = (
                (array.dtype is dtype or array.dtype == dtype)
                and array.ndim == ndim
                and (array.flags.carray if writeable else array.flags.c_contiguous)
            )
        except AttributeError:
            fits = False
        if not fits:
            shape = f"{getattr(array, 'ndim', '?')}-D {getattr(array, 'dtype', type(array))}"
            wanted = "writeable C-contiguous" if writeable else "C-contiguous"
            raise TypeError(f"the kernels take {wanted} {ndim}-D {dtype} arrays here, not {shape}")


# -- the process's choice ----------------------------------------------------------------

_active: KernelSet | None = None
_choose_lock = threading.Lock()


def kernels() -> KernelSet:
    """The process's drift kernels, chosen (and built, if need be) on the first call."""
    if _active is not None:
        return _active
    return _choose()


def active() -> KernelSet | None:
    """The kernels chosen so far, without choosing: None until a model with drift loads."""
    return _active


def _choose() -> KernelSet:
    global _active
    with _choose_lock:
        if _active is not None:
            return _active
        wanted = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
        if wanted not in ("auto", "aot", "jit"):
            raise ValueError(f"{BACKEND_ENV} must be auto, aot or jit, not {wanted!r}")
        if wanted == "jit":
            log.info("drift kernels: Numba JIT in this process (%s=jit)", BACKEND_ENV)
            _active = jit()
            return _active
        try:
            chosen = aot()
        except KernelBuildError as exc:
            if wanted == "aot":
                raise
            log.warning(
                "drift kernels: the ahead-of-time build is not available (%s); using Numba's "
                "JIT in this process instead, which costs about %d MiB more memory (numba and "
                "LLVM loaded); `tidegate kernels build` shows the build's whole output",
                exc,
                JIT_EXTRA_MIB,
            )
            _active = jit()
            return _active
        log.info("drift kernels: ahead of time, from %s (numba not loaded)", chosen.origin)
        _active = chosen
        return _active
