"""Training: run configuration, batches, LR schedules, checkpoints, parallelism and the loop (`illada train`/`sft`).

The losses live apart in `illada.diffusion.objective`, so objective, schedule and sampler stay swappable.
"""
