"""Build foveal's native CPU extension on this machine: ``python -m foveal.kernels.native.build``.

Compiles every ``csrc/*.cpp`` into one shared library with torch's own headers
(``torch.utils.cpp_extension.load``, ninja, the system's C++ compiler), for the
processor it runs on (``-march=native``: the library is built where it runs), with
OpenMP so that ``at::parallel_for`` uses torch's threads. Prints the time it took.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from foveal.kernels.native import BUILD_DIR, NAME, library_path, sources

__all__ = ["build", "FLAGS"]

#: compiler flags: optimised for this processor, OpenMP for at::parallel_for
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-DNDEBUG"]


def build(verbose: bool = False, clean: bool = False) -> float:
    """Build the extension into ``BUILD_DIR``; returns the seconds it took."""
    from torch.utils import cpp_extension

    if clean and BUILD_DIR.exists():
        shutil.rmtree(BUILD_DIR)
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cpp_extension.load(
        name=NAME, sources=[str(p) for p in sources()], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
        build_directory=str(BUILD_DIR), verbose=verbose, with_cuda=False, is_python_module=False,
    )
    if not library_path().exists():
        raise RuntimeError(f"the build finished but {library_path()} is missing")
    library_path().touch()  # newer than every source: the loader's staleness check
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="print the compiler's commands")
    parser.add_argument("--clean", action="store_true", help="remove earlier build files first")
    args = parser.parse_args(argv)
    seconds = build(verbose=args.verbose, clean=args.clean)
    print(f"foveal native extension built in {seconds:.1f} s: {library_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
