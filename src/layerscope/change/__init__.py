"""Change over time: compare checkpoints, drift maths, trajectories over a training run."""
