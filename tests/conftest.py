import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the tests' shared model helpers (_models, _family_models)

# The test models are tiny: one intra-op thread avoids oversubscribing the CI machine's two cores
# (measured here: a tiny mobilenetv3 forward 2.0 s with 2 threads under load, 0.04 s with 1).
torch.set_num_threads(1)
