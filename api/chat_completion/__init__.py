"""POST /v1/chat/completions: wire models, serving, router."""
