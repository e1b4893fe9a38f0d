"""Prefect flows and deployments: thin orchestration over the library (see :mod:`ctharden.flows.pipeline`).

They live in the package (not only in ``flows/``) so that Dask workers and Prefect workers can
import every task by its module path; ``flows/*.py`` are the runnable entry points.
"""
