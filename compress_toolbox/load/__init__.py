"""Stage 1, load: a teacher from any supported file, as an editable torch module verified against
the original (``teacher.py``); one importer per format (``importers/``); the clean-ups that make
foreign graphs editable and prunable (``graph/``); what a module is (``analysis.py``)."""
