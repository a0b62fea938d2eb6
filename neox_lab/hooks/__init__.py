"""The hook contract: named hook points on every stream, and what a hooked model offers its users.

    points            `HookPoint`, the named identity a hook function is attached to
    registry          every hook name a config's model has, with its shape; name templates and shorthand
    hooked            `HookedMixin`: run_with_hooks, hooks(), add_hook, run_with_cache
    activation_cache  `ActivationCache`, what run_with_cache returns

Imports only `neox_lab.config` and `neox_lab.axes`: the model builds on this package, never the reverse.
"""
