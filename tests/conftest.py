import torch

# one thread: the test models are tiny, and on a shared 2-core machine a second thread mostly waits
torch.set_num_threads(1)
