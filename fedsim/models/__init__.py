"""The models clients train: Keras builders and the flat-vector view of their weights
(:mod:`.keras`).
"""
