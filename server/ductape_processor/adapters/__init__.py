"""The outside world: one module per system the processor talks to."""
