"""Causal language models: token-level KD in chunks, on-policy (GKD) and sequence-level
KD, LoRA students, and a pre-flight check of teacher/student compatibility."""
