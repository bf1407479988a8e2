"""Public pretrained weights read into our models: big_vision / AugReg ViTs and MiniLM."""
