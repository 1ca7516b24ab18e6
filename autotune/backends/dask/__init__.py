"""The ``dask`` backend: ``runner`` (the client side), ``tasks`` (what runs on a
worker), ``cluster`` (describing a cluster, finding its profile)."""
