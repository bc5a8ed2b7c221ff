"""Training studies: the score-matching toy (Wu et al. 2025), learning-rate sweeps, training-time mitigations."""
