"""Who runs next: per-tenant queues, the batch-at-a-time batcher and the step scheduler."""
