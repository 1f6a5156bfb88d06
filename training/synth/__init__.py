"""Synthetic clips (`m2 synth`): the figure, its motion, the scene, the renderer, the captions."""
