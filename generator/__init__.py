"""Generative Adapter: a context becomes a LoRA adapter in one forward pass of the base model."""
