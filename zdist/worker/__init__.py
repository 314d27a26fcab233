"""DEALER workers, their supervisor (nanny) and the zworker CLI."""
