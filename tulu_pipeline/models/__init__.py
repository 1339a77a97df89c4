"""Model artifacts: the embedded base model, converted once to a Hugging Face directory."""
