"""The Generative Adapter server: FastAPI app, adapter store and vLLM multi-LoRA engine."""
