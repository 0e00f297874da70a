"""Stage 2, student: derived from the teacher by shrinking its widths (``derive``, with
``shuffle_pruning`` for channel shuffles and splits) or picked from the model zoo (``plan``)."""
