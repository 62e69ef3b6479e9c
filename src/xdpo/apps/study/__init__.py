"""`xdpo study`: a fair, multi-seed comparison of Diffusion-DPO / Flow-DPO, xDPO and the baselines in both
digits worlds, with the Kang et al. ablation (plan.py: what runs; runner.py: one job; report.py: the report)."""
