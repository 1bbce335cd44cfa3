"""One rank's sharded-checkpoint save and load, timed and its resident-memory rise measured (run by scaling.py
under torchrun; alone it is one process).

Each rank builds the trainer of the given recipe overrides, takes one step (so AdamW's moments exist), saves a
sharded checkpoint through the trainer and loads it back through the parallel strategy, and writes its seconds,
peak resident-memory rise and the bytes of its own shard files to RESULT.rankN.json.

    torchrun --nproc-per-node 2 benchmarks/dcp_roundtrip.py OUT RESULT --set model.preset=small ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moelm.dist.checkpoint import SHARDS_DIR
from moelm.dist.meters import ResidentPeak
from moelm.dist.runtime import end_process
from moelm.train.recipe import load_recipe
from moelm.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    recipe = load_recipe(None, [*args.overrides, "train.max_steps=1", "log.sample_tokens=0", "log.progress=false"])
    trainer = Trainer(recipe, args.out, echo=lambda line: None)
    trainer.setup()
    trainer.train_step([trainer.batches.train_batch(0)], trainer.loss)
    trainer.state.step = 1
    with ResidentPeak() as save:
        trainer.save()
    shards = args.out / "checkpoints" / "step-1" / SHARDS_DIR
    rank = trainer.context.rank
    own_bytes = sum(path.stat().st_size for path in shards.glob(f"__{rank}_*"))
    with ResidentPeak() as load:
        trainer.parallel.load_shards(shards, trainer.model, trainer.optimizer)
    elements = sum(
        trainer.parallel.local_rows(name, p).global_shape.numel() for name, p in trainer.model.named_parameters()
    )
    record = {
        "rank": rank,
        "full_state_mb": round(elements * 12 / 1e6, 1),  # float32 weights and two AdamW moments, unsharded
        "save_s": round(save.seconds, 3),
        "load_s": round(load.seconds, 3),
        "save_rss_rise_mb": round(save.peak / 1e6, 1),
        "load_rss_rise_mb": round(load.peak / 1e6, 1),
        "shard_mb": round(own_bytes / 1e6, 1),
    }
    Path(f"{args.result}.rank{rank}.json").write_text(json.dumps(record))
    end_process(0)


if __name__ == "__main__":
    main()
