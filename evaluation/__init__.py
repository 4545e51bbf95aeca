"""Evaluation: FVD/KVD on Kinetics-400 I3D logits, the UCF-101 zero-shot protocol, CLIPSIM."""
