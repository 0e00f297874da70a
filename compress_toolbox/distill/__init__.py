"""Stage 3, distill: the training loop (``trainer``) and its parts (``parts``: stopping, replay
pool, threads, checkpoints, progress), the recipe sized to the machine (``recipe``, ``presets``),
the run's health (``health``), several processes (``distributed``, ``local_launch``), and the
data-free methods (``methods/``) with their generator and losses."""
