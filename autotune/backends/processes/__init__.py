"""The ``processes`` backend: a pool of worker processes (``pool``) and the
worker's side (``worker``)."""
