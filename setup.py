"""Build script. Pure-Python for now; the CUDA extension ``gpt2fast._C`` joins here when its kernels land."""

from setuptools import setup

setup()
