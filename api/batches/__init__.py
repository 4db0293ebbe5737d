"""/v1/batches: wire models, serving, the line codec and the runner that drives batches."""
