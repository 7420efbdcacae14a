"""Metrics (a transport-neutral recorder and snapshots), their Prometheus exposition, and key=value logs with
request ids. May read the core's and the jobs' state through their public snapshots; never changes it.
"""
