"""One router per resource: jobs, batches, images (OpenAI-compatible), system (health, metrics, cache)."""
