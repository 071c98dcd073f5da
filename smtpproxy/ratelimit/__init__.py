"""Rate limits (GCRA with burst, concurrency) and per-connection limits.

Modules: ``gcra`` (the pure algorithm), ``keys`` (what a limit counts by),
``store``/``memory``/``redis_store`` (where the state lives), ``limiter``
(limits of a stage in one store call, fail open/closed), ``check`` (the
pipeline check and its factory), ``session_limits`` (per-connection policy).
Kept import-free: the config model imports ``gcra`` and ``keys``.
"""
