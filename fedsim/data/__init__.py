"""Stage 1, data: the clients' datasets (:mod:`.base` the protocol, :mod:`.loaders` the
bundled and local datasets, :mod:`.partition` IID and Dirichlet splits, :mod:`.tff`
TFF ClientData).
"""
