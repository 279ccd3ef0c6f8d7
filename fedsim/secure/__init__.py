"""Stage 6, secure sum: fixed-point encoding (:mod:`.fixedpoint`), the record layout
(:mod:`.layout`) and the SecAgg / SecAgg+ protocol (:mod:`.protocol`).
"""
