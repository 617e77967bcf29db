"""Engine latency as a cost: a per-module table measured on the target engine (``table``: pure arithmetic and I/O;
``measure``: the probes, exported and timed on the engine). ``LatencyTable`` feeds ``--budget-metric latency``
(``slimexport.allocate.api.plan_ranks(..., latency=table)``) and predicts a slim UNet's latency from its ranks."""

from slimexport.latency.table import Group, LatencyTable, TableKey, table_path

__all__ = ["Group", "LatencyTable", "TableKey", "measure_table", "table_path"]


def __getattr__(name):
    if name == "measure_table":  # torch, the engines: only when asked for
        from slimexport.latency.measure import measure_table

        return measure_table
    raise AttributeError(f"module 'slimexport.latency' has no attribute {name!r}")
