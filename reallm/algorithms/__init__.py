"""RLHF algorithms: the experiments' runtimes and their math."""
