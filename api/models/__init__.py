"""/v1/models: the models this deployment serves."""
