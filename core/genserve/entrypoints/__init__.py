"""Ways into genserve besides the HTTP server: ``llm.LLM`` for offline batched generation."""
