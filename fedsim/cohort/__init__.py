"""Stage 2, cohort: which clients a round samples (:mod:`.sampling`) and which of them
drop, straggle or report (:mod:`.faults`).
"""
