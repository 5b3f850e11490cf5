"""Batch analysis of many run logs and acquisition files (``stemagent batch``): inputs and outputs.

:mod:`stemagent.batch.inputs` finds what to analyse; :mod:`stemagent.batch.outputs` writes and
checks the Parquet tables of each input. The distributed engine (Dask) and the pipeline are
wired in ``agent/app/batch.py`` and ``agent/app/batch_worker.py``.
"""
