"""Build entry point.

The package metadata lives in pyproject.toml. This file exists so that a
compiled extension (the native fused op from ``csrc/``) can be added to the
build later; today the package is pure Python.
"""

from setuptools import setup

setup()
