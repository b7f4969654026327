"""`python -m tidegate.kernels_build OUTDIR`: the drift kernels, compiled ahead of time.

Run in a subprocess by `kernel_backend.build()` (or `tidegate kernels build`), so the
server never imports numba for it. numba.pycc compiles the very functions of kernels.py
(their `py_func`, with the helpers they call) into one CPython extension,
`_tidegate_kernels`, once per signature the server calls them with: float32 and float64
batches, read-only allowed, and the int64/float64 C-contiguous state that drift.py keeps.
There is no second copy of the kernel code: a change to kernels.py changes the cache key
(kernel_backend) and so rebuilds the extension.

pycc makes two choices that the kernels must not inherit, and has no option for either,
so this module changes them before compiling:
- the GIL: pycc's wrappers hold it through the call (its flags lack `release_gil`). The
  JIT kernels are `nogil=True`, which lets the drift observer's thread run them while the
  event loop serves; so the flags here release it too.
- the CPU: pycc compiles for a CPU name's default features ('host' passes the name only),
  which can include instructions a VM hides. The JIT compiles for the features the host
  reports; so does this build. The code is the JIT's, and as fast (generic x86-64 code is
  2.6x slower, benchmarks/RESULTS.md); the cache key names the CPU, so a binary never
  runs on another one.

pycc needs a C and C++ compiler (it links the module with setuptools' distutils) and
is pending deprecation in numba: its warning is silenced here, where it is used. Exit
codes: 0 built, 2 no working compiler, 1 anything else.
"""

import sys
import time
import warnings
from pathlib import Path
from typing import Any

from numba import types
from numba.core import codegen, compiler
from numba.core.errors import NumbaPendingDeprecationWarning

from tidegate import kernels
from tidegate.kernel_backend import BATCH_DTYPES, EXTENSION

with warnings.catch_warnings():
    warnings.simplefilter("ignore", NumbaPendingDeprecationWarning)
    from numba.pycc import compiler as pycc_compiler
    from numba.pycc.cc import CC

_NUMBA_TYPES = {"f32": types.float32, "f64": types.float64}


def _array(dtype: Any, ndim: int, readonly: bool = False) -> Any:
    return types.Array(dtype, ndim, "C", readonly=readonly)


def exports() -> dict[str, tuple[Any, Any]]:
    """Exported name -> (kernel, signature): the inputs read-only (so a read-only
    `np.frombuffer` batch and a writeable one share one signature), the state writeable."""
    f64, i64 = types.float64, types.int64
    edges, vector = _array(f64, 2, readonly=True), _array(f64, 1, readonly=True)
    counts, tallies, sums = _array(i64, 2), _array(i64, 1), _array(f64, 1)
    table: dict[str, tuple[Any, Any]] = {}
    for suffix in BATCH_DTYPES:
        batch = _array(_NUMBA_TYPES[suffix], 2, readonly=True)
        features = (batch, edges, vector, vector, vector, counts, *[tallies] * 4, *[sums] * 4)
        table[f"update_features_{suffix}"] = (kernels.update_features, types.void(*features))
        table[f"update_argmax_{suffix}"] = (kernels.update_argmax, types.void(batch, tallies, sums))
    indices = _array(i64, 1, readonly=True)
    table["update_classes"] = (kernels.update_classes, types.void(indices, tallies))
    return table


def _gil_free_flags() -> compiler.Flags:
    flags = compiler.Flags()
    flags.release_gil = True  # type: ignore[misc,assignment]  # numba's Option descriptor
    return flags


def _as_the_jit_compiles() -> None:
    """Release the GIL in the wrappers and target the host's own CPU features."""
    # pycc makes its flags with a bare `Flags()` call, and sets no features of its own.
    pycc_compiler.Flags = _gil_free_flags  # type: ignore[attr-defined,assignment]
    host_features = codegen.JITCPUCodegen._customize_tm_features
    codegen.AOTCPUCodegen._customize_tm_features = host_features  # type: ignore[assignment]


def build(out: Path) -> Path:
    """Compiles the extension into `out`; returns its path.

    Raises:
        RuntimeError: no working C/C++ compiler (pycc's own check).
    """
    _as_the_jit_compiles()
    cc = CC(EXTENSION)  # checks the compiler first, before minutes of LLVM work
    cc.output_dir = str(out)
    cc.target_cpu = "host"
    for name, (kernel, signature) in exports().items():
        cc.export(name, signature)(kernel.py_func)
    cc.compile()
    return out / str(cc.output_file)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tidegate.kernels_build OUTDIR", file=sys.stderr)
        return 1
    started = time.monotonic()
    try:
        path = build(Path(argv[0]))
    except RuntimeError as exc:
        if "compiler" not in str(exc):
            raise
        reason = " ".join(str(exc).split())
        print(f"no working C/C++ compiler (numba.pycc builds with one): {reason}", file=sys.stderr)
        return 2
    print(f"built {path} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
