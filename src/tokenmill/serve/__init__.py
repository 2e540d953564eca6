"""`tokenmill serve`: an OpenAI-compatible HTTP server over the generation engine (protocol and queueing only)."""
