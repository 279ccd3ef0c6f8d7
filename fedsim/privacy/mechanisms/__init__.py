"""DP mechanisms, one file each: what ``dp.mechanism`` names.

A mechanism (:class:`fedsim.privacy.mechanisms.base.Mechanism`) says what it can
do (capabilities), checks its options, states its per-round DpEvent, is
calibrated to a target epsilon, and builds the aggregator that runs it in the
actors. ``dp.mechanism`` is a built-in name or a user's ``module:callable``
returning a Mechanism; :func:`fedsim.privacy.mechanisms.base.resolve_mechanism`
resolves it. Nothing here imports TensorFlow: the driver checks configs and
accounts for privacy without it.
"""
