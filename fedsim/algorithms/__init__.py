"""Stage 7, server algorithm: how the server applies the aggregate (:mod:`.optimizers`:
FedAvg, FedAdam, FedYogi).
"""
