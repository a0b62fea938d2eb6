"""Placeholder replaced by the ActivationCache implementation."""


class ActivationCache(dict):
    def __init__(self, store, model):
        super().__init__(store)
