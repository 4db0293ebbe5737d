"""The HTTP process: OpenAI wire models, routes, SSE framing, error mapping. Never imports torch."""
