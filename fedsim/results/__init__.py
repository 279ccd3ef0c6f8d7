"""Stage 8, results: metrics files, plots and TensorBoard (:mod:`.outputs`),
checkpoints, and sweep summaries.
"""
