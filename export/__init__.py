"""Export: the only place torch, transformers and peft appear. Writes bundles."""
