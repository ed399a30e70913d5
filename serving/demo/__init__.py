"""The embedded demo: building its model and prompts, their scoring and task embeddings."""
