"""Model and tokenizer helpers: tiny self-built checkpoints, fingerprints."""
