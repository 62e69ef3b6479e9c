"""On-policy preference pairs labelled by reward models (`xdpo pairs`) and AI relabelling (`xdpo relabel`).

Diffusion-DPO's "AI feedback" experiment (Wallace et al. 2024, §5.4) and flow_grpo's online DPO: sample K
images per prompt from the model being aligned, score them with a reward model, and keep best-vs-worst
(or every sufficiently separated) pairs in the Pick-a-Pic v2 schema that `xdpo train` reads.
"""
