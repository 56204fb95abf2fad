"""Packaging lives in setup.cfg; this file only maps kernels/ onto hpcdl.kernels."""
from setuptools import setup

setup(
    package_dir={"hpcdl": "hpcdl", "hpcdl.kernels": "kernels"},
    packages=[
        "hpcdl",
        "hpcdl.bench",
        "hpcdl.comm",
        "hpcdl.data",
        "hpcdl.layers",
        "hpcdl.optim",
        "hpcdl.kernels",
    ],
    package_data={"hpcdl.kernels": ["*.cu"]},
)
