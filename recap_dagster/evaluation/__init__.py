"""Evaluation: the world interface (prompts and their ground truth), GenEval, the metrics,
a variant's evaluation loop, the RECAP report and its plots. Plain Python, no Dagster."""
