"""Stage 4, aggregation: the Aggregator protocol over partial sums (:mod:`.base`),
and robust aggregators over stacked updates (:mod:`.robust`: :mod:`.median`,
:mod:`.trimmed_mean`, :mod:`.krum`, :mod:`.bulyan`)."""
