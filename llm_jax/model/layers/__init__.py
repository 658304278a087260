"""Building blocks of the Llama decoder: norms, rotary embeddings, attention, MLP, embeddings."""
