"""glm45v serve: an OpenAI-compatible HTTP server over one LLM (app, protocol, engine loop, media, metrics)."""
