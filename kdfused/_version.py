"""The version of kdfused: the one place it is written (setup.py reads it without importing the
package). A built package's full version adds a local label saying what it was built for, e.g.
``0.3.0+torch2.14.1.cu130``; ``kdfused.build_info()["version"]`` reports it."""

__version__ = "0.3.0"
