import torch

# The CI box has 2 cores: training inside the pytest process stays on one, so trainer subprocesses
# get the other (two intra-op threads on a loaded machine spin-wait each other).
torch.set_num_threads(1)
