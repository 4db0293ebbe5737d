"""Serving pieces the endpoints share: following a job, grammars for structured output and tools, caps."""
