"""Rollouts: samples from the current policy, scored by reward models (online training's data).

`rounds.PairRounds` makes online DPO's rounds (best-vs-worst pairs per prompt, `online.enabled`); the
training recipe reaches it through its round-maker protocol (`xdpo.train.sources`), never by import.
"""
