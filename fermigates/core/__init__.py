"""The bottom layer, shared by everything above it and importing nothing else of ours: the qualname-keyed
registries of per-family knowledge (``registry``), layer layouts and attention specs (``layouts``), the twin
marker every method's converted layer carries (``twin``), the conversion record and its accessors (``state``),
batch and model-call helpers (``batches``), undoable module edits (``modules``), sparsity counts (``sparsity``)
and the options mixin of every config dataclass (``options``)."""
