"""Adapters for training frameworks (each needs its framework installed; imported only when used)."""
