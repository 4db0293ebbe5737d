"""The edge every request crosses: strict body parsing, size limits, auth, request ids, SSE framing."""
