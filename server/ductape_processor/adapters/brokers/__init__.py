"""Message-broker adapters: the interface (`base`), the toolkit they share, one module per broker and the registry
of broker types (`registry`)."""
