"""Webhooks: signed events, delivered at least once, when a background response or a batch ends."""
