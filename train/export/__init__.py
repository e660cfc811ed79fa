"""Export and import: `python -m train.export RUN OUT` writes a checkpoint (any ZeRO stage) or an HF export as a
Hugging Face directory or (`--format gguf`) a GGUF file for llama.cpp / Ollama with its Modelfile; `hf` converts
between our weights and `Phi3ForCausalLM` safetensors both ways, `gguf` writes llama.cpp's `phi3` files."""
