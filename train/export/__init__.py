"""Export and import: `python -m train.export RUN OUT` writes a checkpoint (any ZeRO stage) as a Hugging Face
directory; `hf` converts between our weights and `Phi3ForCausalLM` safetensors both ways."""
