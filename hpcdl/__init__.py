"""hpcdl: MPI data-parallel deep learning on NumPy/CuPy.

Importing the package is deliberately cheap (no NumPy, no MPI): the `hpcdl`
entry point must pin BLAS threads before NumPy loads, and `hpcdl --help`
should not initialise MPI.
"""

__version__ = "0.1.0"
