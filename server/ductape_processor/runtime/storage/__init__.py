"""Storage: a product's files on the local disk or a cloud provider. `operations.StorageRuntime` runs every call;
`files` checks what is saved (keys, metadata, content types, sizes and checksums as bytes stream in)."""
