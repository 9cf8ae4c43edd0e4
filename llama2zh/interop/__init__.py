"""Interop with the rest of the ecosystem: Hugging Face (export, import), GGUF (+ Ollama
Modelfile), llama2.c model.bin imports, and the registry of published tiny llamas."""
