"""Training-loop concerns: hooks, optimizer groups, checkpoints, launch, trunk pretraining."""
