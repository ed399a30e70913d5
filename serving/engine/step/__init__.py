"""The step executor: T5 decoding one step at a time over fixed slots (the slot cache, the step forward, decode graphs)."""
