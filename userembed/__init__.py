"""userembed: the contract shared by the trainer, the server and the refresh job.

Nothing in this package imports torch. It holds the input schema, the rules that turn
feature rows into encoder inputs, the model manifest and registry, the Redis vector layout,
and the one console CLI (`userembed`).
"""

__version__ = "0.1.0"
