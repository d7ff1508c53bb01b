"""A writer killed between write and rename leaves a temporary behind; the resumed run removes it."""

from varq import pipeline
from varq.sample.shards import shard_path


def test_stale_temporaries_are_dropped_on_resume(run_config):
    cfg = run_config("model=var_tiny", "eval=smoke", "device=cpu", "eval.batch_size=2")
    samples_dir = pipeline.run_paths(cfg).samples_dir
    samples_dir.mkdir(parents=True)
    stale = samples_dir / f".{shard_path(samples_dir, 1).name}.4242.tmp"
    stale.write_bytes(b"half a shard")
    pipeline.run(cfg)
    assert not stale.exists()
    assert all(p.name.startswith("batch_") for p in samples_dir.iterdir())
