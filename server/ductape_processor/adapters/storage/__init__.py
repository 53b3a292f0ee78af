"""Storage providers: one module per provider behind `base.StorageAdapter`, found through `registry`."""
