"""/v1/responses: wire models, serving (blocking, streamed, background), router."""
