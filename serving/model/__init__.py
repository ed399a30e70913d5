"""Loading the frozen model: checkpoints, named random shapes and the embedded default."""
