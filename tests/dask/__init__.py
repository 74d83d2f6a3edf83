"""Tests of the Dask backend (embserve_dask)."""
