"""Flask admin sidecar for the pooler."""
