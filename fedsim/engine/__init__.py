"""Running it on Ray: the server actor, the worker actors (one per CPU, many virtual
clients each), the parts the config names.
"""
