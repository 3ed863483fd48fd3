"""Build entry point.

The package metadata lives in pyproject.toml. This file only ships the C++ and
CUDA sources of ``csrc/`` inside the package, as ``keras_residual/_csrc``: the
native kernels are compiled on first use, on the user's machine, against the
framework version installed there (see ``keras_residual/native/_build.py``),
so installing never compiles anything and never fails for want of a compiler.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE_SUFFIXES = {".h", ".cuh", ".cpp", ".cc", ".cu"}


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        csrc = Path(__file__).resolve().parent / "csrc"
        target = Path(self.build_lib) / "keras_residual" / "_csrc"
        for path in csrc.rglob("*"):
            if path.is_file() and path.suffix in SOURCE_SUFFIXES:
                destination = target / path.relative_to(csrc)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)


setup(cmdclass={"build_py": BuildPyWithSources})
