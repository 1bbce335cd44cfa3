"""Values several floors share (data packing, the model's loss, SFT masks): one definition, imported downward."""

IGNORE_INDEX = -100  # label of a position that carries no loss (PyTorch's and transformers' convention)
