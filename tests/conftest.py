import warnings

import torch

# transformers warns once per kernel that it falls back to its PyTorch implementation on CPU.
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
# The test models are tiny: threads only add synchronisation (and stall badly on a busy machine).
torch.set_num_threads(1)
