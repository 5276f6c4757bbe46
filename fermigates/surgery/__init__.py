"""Model surgery shared by every method: the runtime-captured dependency graph (``trace``, ``ops``,
``labels``, ``leaves``, ``graph``), the physical shrink, batch-norm folding, MAC counting, and the checks
that compare a model's outputs before and after an edit (``verify``)."""
