"""Stage 3, client training: one client's local update (:mod:`.local` SGD,
:mod:`.vectorized` many clients per call, :mod:`.dp_sgd` example-level DP-SGD).
"""
