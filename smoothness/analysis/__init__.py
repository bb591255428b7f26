"""Analysis layer: what the surfaces and caches mean together.

* ``caching_error``: how much caching changes a chain at a step (``CachingErrorConfig``);
* ``correlate``: smoothness scores against caching error, Spearman / Pearson with bootstrap intervals;
* ``dynamics``: each block's change between sampler steps (the paper's v1 Fig. 4);
* ``spectral``: Jacobian spectral norms per unit and end to end;
* ``stats``: rank correlation and the paired bootstrap.

May import the engines (``surface``, ``cache``) and the core, never ``plots`` or a CLI; ``cli`` is
the command ``python -m smoothness.correlate``.
"""
