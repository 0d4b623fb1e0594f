"""fastsae's Triton kernels, installed as ``fastsae.kernels`` (this directory sits at the top of
the repository).

Run from a checkout, the repository root is on ``sys.path`` (``python -m ...`` puts the working
directory there, pytest its root), so ``import kernels`` anywhere finds this directory first.
Hugging Face's ``kernels`` distribution, which ``transformers`` >= 5.25 requires and imports,
would then be shadowed and transformers fails to import. So when this file is imported under the
bare name ``kernels`` it hands the name to the installed distribution. Without one it stays an
empty module, as it always was: transformers < 5.25 imports whatever ``find_spec("kernels")``
finds when no metadata names it, and must not see an error (it then reads no version and treats
kernels as unavailable).
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
