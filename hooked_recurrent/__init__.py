"""TransformerLens-style hooks on the matrix state writes of recurrent language models."""
