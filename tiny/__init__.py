"""The tiny world: a toy text-to-image task set small enough for a CPU, its pretraining, and the
chains that reproduce the comparison on it (python -m tiny.pretrain, bash tiny/reproduce.sh)."""
