"""Stage 4, aggregation: the Aggregator protocol over partial sums (:mod:`.base`)."""
