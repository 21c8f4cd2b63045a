"""What the results table says beyond its numbers: intervals over seeds and test units, paired
model-vs-baseline verdicts, rank intervals and multi-dataset tests (:mod:`.intervals`)."""
