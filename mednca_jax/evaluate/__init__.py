"""Evaluation: batched inference, per-patient scores, the NCA quality metric, robustness
suites and their perturbations, plots, and ``predict`` on new scans."""
