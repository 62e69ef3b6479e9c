"""`xdpo demo`: the digits world end to end (pairs, training, curves, evaluation, report)."""
