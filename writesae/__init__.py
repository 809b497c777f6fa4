"""WriteSAE: sparse autoencoders whose atoms are rank-1 matrices shaped like a recurrent write."""
