"""Support code shared by the commands of ``lib/`` (``python -m lib.<command>``):
``measure`` (memory sampling for the benchmark and the load test)."""
