"""Pure inference: loading a Llama-3-compatible model, rendering chat prompts, generating text.

Plain arguments in, typed results out. Nothing here knows about Redis, Celery or settings.
"""
