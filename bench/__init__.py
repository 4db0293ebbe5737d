"""`make bench`: the raw engine, the queued service and a seed-like server, measured side by side."""
