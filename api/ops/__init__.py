"""Operations: /health, /metrics (Prometheus) and the chat page at /."""
