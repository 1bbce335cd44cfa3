"""torch.distributed for moelm: torchrun process groups and meshes, FSDP2, expert parallelism by all-to-all."""
